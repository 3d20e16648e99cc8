//! Reading one variable: empty counts as unset, defaults come from the table, and every bad value
//! becomes a [`ConfigError`] naming the variable and the accepted form.

use std::{fmt, str::FromStr, time::Duration};

use super::VARS;

/// A configuration value that cannot be used; the message names the variable and its form.
#[derive(Debug, thiserror::Error)]
#[error("invalid {var}: {problem} (expected {expected})")]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
    pub expected: &'static str,
}

pub(super) struct Env<'a> {
    pub(super) lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    pub(super) fn optional(&self, name: &'static str) -> Option<String> {
        debug_assert!(
            VARS.iter().any(|v| v.name == name),
            "{name} missing from VARS"
        );
        (self.lookup)(name).filter(|v| !v.trim().is_empty())
    }

    /// The value or the table's default; only for variables that have one.
    pub(super) fn value(&self, name: &'static str) -> String {
        self.optional(name).unwrap_or_else(|| {
            VARS.iter()
                .find(|v| v.name == name)
                .and_then(|v| v.default)
                .expect("variable has a default")
                .to_owned()
        })
    }

    pub(super) fn parse<T: FromStr>(
        &self,
        name: &'static str,
        expected: &'static str,
    ) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        let raw = self.value(name);
        raw.trim()
            .parse()
            .map_err(|e| invalid(name, format!("{raw:?}: {e}"), expected))
    }

    pub(super) fn boolean(&self, name: &'static str) -> Result<bool, ConfigError> {
        let raw = self.value(name);
        match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(invalid(name, format!("{raw:?}"), "true or false")),
        }
    }

    pub(super) fn bounded(
        &self,
        name: &'static str,
        min: usize,
        max: usize,
    ) -> Result<usize, ConfigError> {
        let raw = self.value(name);
        match raw.trim().parse::<usize>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ConfigError {
                var: name,
                problem: format!("{raw:?}"),
                expected: leak_range(min, max),
            }),
        }
    }

    pub(super) fn duration(&self, name: &'static str) -> Result<Duration, ConfigError> {
        let raw = self.value(name);
        humantime::parse_duration(raw.trim()).map_err(|e| {
            invalid(
                name,
                format!("{raw:?}: {e}"),
                "a duration such as 500ms, 2s or 1m",
            )
        })
    }
}

impl Env<'_> {
    /// A duration inside `range`; `expected` names the range for the error.
    pub(super) fn duration_within(
        &self,
        name: &'static str,
        range: std::ops::RangeInclusive<Duration>,
        expected: &'static str,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(name)?;
        if range.contains(&d) {
            Ok(d)
        } else {
            Err(invalid(name, format!("{:?}", self.value(name)), expected))
        }
    }
}

/// `expected` is `&'static str` so errors stay cheap to build; ranges are few and fixed.
fn leak_range(min: usize, max: usize) -> &'static str {
    Box::leak(format!("an integer from {min} to {max}").into_boxed_str())
}

pub(super) fn invalid(var: &'static str, problem: String, expected: &'static str) -> ConfigError {
    ConfigError {
        var,
        problem,
        expected,
    }
}
