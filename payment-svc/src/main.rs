//! The payment service is built by the saga issue (#3). Until then this binary only says
//! so and exits non-zero, so that nothing mistakes it for a working service.

fn main() -> std::process::ExitCode {
    eprintln!("payment-svc is not implemented yet: see the saga issue");
    std::process::ExitCode::FAILURE
}
