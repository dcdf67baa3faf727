//! Parsing each binary's `Config`: flags and environment variables in one typed pass (clap),
//! where an invalid value stops the process at start-up. clap's message names the flag; an
//! operator sets the variable, so the message here says which variable held the value.

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// Parses `C` from the command line and the environment as `C::parse` does; on an invalid
/// value that came from an environment variable, says the variable's name before clap's
/// message, then exits as clap does (status 2).
pub fn parse<C: clap::Parser>() -> C {
    C::try_parse().unwrap_or_else(|error| {
        // The variable is named only when it holds the refused value (a flag may have).
        let refused = match error.get(ContextKind::InvalidValue) {
            Some(ContextValue::String(value)) => Some(value.clone()),
            _ => None,
        };
        if let Some(variable) = variable_of(&C::command(), &error)
            && std::env::var(&variable).ok() == refused
        {
            eprintln!("invalid configuration: {variable} holds a value that cannot be used");
        }
        error.exit()
    })
}

/// The environment variable behind the argument an invalid-value error is about, if it has
/// one.
pub fn variable_of(command: &clap::Command, error: &clap::Error) -> Option<String> {
    if !matches!(error.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation) {
        return None;
    }
    let Some(ContextValue::String(shown)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    // Shown as `--kafka-linger-ms <KAFKA_LINGER_MS>`.
    let long = shown.split_whitespace().next()?.strip_prefix("--")?;
    command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))?
        .get_env()
        .map(|env| env.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Config {
        #[command(flatten)]
        tuning: crate::kafka::KafkaTuning,
        #[command(flatten)]
        telemetry: crate::telemetry::TelemetryArgs,
    }

    #[test]
    fn an_invalid_value_names_its_variable() {
        for (flag, value, variable) in [
            ("--kafka-linger-ms", "soon", "ORDERFLOW_KAFKA_LINGER_MS"),
            ("--kafka-fetch-min-bytes", "-1", "ORDERFLOW_KAFKA_FETCH_MIN_BYTES"),
            ("--metrics-addr", "localhost:metrics", "ORDERFLOW_METRICS_ADDR"),
            ("--log", "order_svc=loud", "RUST_LOG"),
        ] {
            let error = Config::try_parse_from(["test".to_owned(), format!("{flag}={value}")]).expect_err("refused");
            assert_eq!(
                variable_of(&Config::command(), &error).as_deref(),
                Some(variable),
                "{flag}"
            );
        }
        let error = Config::try_parse_from(["test", "--no-such-flag"]).expect_err("refused");
        assert_eq!(variable_of(&Config::command(), &error), None, "not an invalid value");
    }
}
