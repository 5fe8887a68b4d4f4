//! `tessera-usigd`: the USIG daemon on its own (see the crate docs and docs/OPERATIONS.md).

use clap::Parser;
use tessera_usigd::cli::UsigdOptions;

/// The USIG daemon: owns one replica's USIG key and counter, serves it over a Unix socket.
#[derive(Parser, Debug)]
#[command(name = "tessera-usigd", version)]
struct Command {
    #[command(flatten)]
    options: UsigdOptions,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let command = Command::parse();
    match command.options.run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tessera-usigd: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
