//! `rblk-driver`: the restartable, unprivileged block driver process (see `driver::cli`).
//! `rblk serve` starts it with the image, the listening socket and a heartbeat pipe.

fn main() -> std::process::ExitCode {
    driver::cli::main()
}
