fn main() -> std::process::ExitCode {
    refrag::cli::main()
}
