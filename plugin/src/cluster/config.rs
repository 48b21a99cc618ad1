//! [`ClusterConfig`]: where the cluster lives and what its JetStream objects are called.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ClusterError;

/// The NATS server and the names of the stream, consumer and buckets every process of one
/// cluster shares. Every field but `url` has a default; two clusters on one NATS server need
/// different names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// The NATS server, `nats://HOST:PORT`.
    pub url: String,
    /// The durable stream of sealed groups. Default `LEAF_GROUPS`.
    pub stream: String,
    /// The subject replicas publish groups on. Default `leaf.groups`.
    pub subject: String,
    /// The trainer's durable pull consumer. Default `leaf-trainer`.
    pub consumer: String,
    /// The object store bucket of version files. Default `leaf-versions`.
    pub versions_bucket: String,
    /// The key-value bucket holding `current`. Default `leaf-control`.
    pub control_bucket: String,
    /// Groups a replica buffers while NATS is unreachable; more are dropped and counted
    /// (`leaf_groups_dropped_total{reason="cluster"}`). Default 1024.
    pub buffer: usize,
    /// How long the server deduplicates a group id (`Nats-Msg-Id`), seconds. Default 600.
    pub duplicate_window_s: f64,
    /// How long the trainer may hold a group unacked before it is redelivered, seconds: longer
    /// than an update plus a checkpoint. Default 300.
    pub ack_wait_s: f64,
    /// How long groups stay in the stream, seconds (0: until the limits below). Default 7 days.
    pub max_age_s: f64,
    /// Longest wait for one publish acknowledgement, seconds. Default 5.
    pub publish_timeout_s: f64,
    /// This replica's name in group message ids; empty: a fresh UUID per process (a restarted
    /// replica numbers its groups from zero again, so the name must change with the process).
    pub replica_id: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            url: "nats://127.0.0.1:4222".into(),
            stream: "LEAF_GROUPS".into(),
            subject: "leaf.groups".into(),
            consumer: "leaf-trainer".into(),
            versions_bucket: "leaf-versions".into(),
            control_bucket: "leaf-control".into(),
            buffer: 1024,
            duplicate_window_s: 600.0,
            ack_wait_s: 300.0,
            max_age_s: 7.0 * 24.0 * 3600.0,
            publish_timeout_s: 5.0,
            replica_id: String::new(),
        }
    }
}

impl ClusterConfig {
    /// The defaults for the NATS server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        ClusterConfig {
            url: url.into(),
            ..ClusterConfig::default()
        }
    }

    /// Checks every value; the error names the field.
    pub fn check(&self) -> Result<(), ClusterError> {
        let bad = |m: String| Err(ClusterError::Config(m));
        if !(self.url.starts_with("nats://") || self.url.starts_with("tls://")) {
            return bad(format!(
                "url {:?} must look like nats://HOST:PORT",
                self.url
            ));
        }
        for (field, name) in [
            ("stream", &self.stream),
            ("consumer", &self.consumer),
            ("versions_bucket", &self.versions_bucket),
            ("control_bucket", &self.control_bucket),
        ] {
            let ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return bad(format!(
                    "{field} {name:?} must be non-empty letters, digits, '-' or '_'"
                ));
            }
        }
        if self.subject.is_empty()
            || self.subject.contains([' ', '*', '>'])
            || self.subject.split('.').any(str::is_empty)
        {
            return bad(format!(
                "subject {:?} must be a literal NATS subject",
                self.subject
            ));
        }
        if self.buffer == 0 {
            return bad("buffer must be positive".into());
        }
        for (field, v, min) in [
            ("duplicate_window_s", self.duplicate_window_s, 1.0),
            ("ack_wait_s", self.ack_wait_s, 1.0),
            ("publish_timeout_s", self.publish_timeout_s, 0.01),
            ("max_age_s", self.max_age_s, 0.0),
        ] {
            if !(v.is_finite() && v >= min) {
                return bad(format!("{field} {v} must be at least {min}"));
            }
        }
        if self.max_age_s > 0.0 && self.max_age_s < self.duplicate_window_s {
            return bad(format!(
                "max_age_s {} is below duplicate_window_s {}",
                self.max_age_s, self.duplicate_window_s
            ));
        }
        if self.replica_id.contains([' ', '.', '*', '>']) {
            return bad(format!(
                "replica_id {:?} may not hold spaces, '.', '*' or '>'",
                self.replica_id
            ));
        }
        Ok(())
    }

    pub(crate) fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_bad_values_are_named() {
        ClusterConfig::new("nats://127.0.0.1:4222").check().unwrap();
        let mut c = ClusterConfig::new("127.0.0.1:4222");
        assert!(c.check().unwrap_err().to_string().contains("url"));
        c.url = "nats://h:1".into();
        c.stream = "a.b".into();
        assert!(c.check().unwrap_err().to_string().contains("stream"));
        c.stream = "S".into();
        c.subject = "leaf.*".into();
        assert!(c.check().unwrap_err().to_string().contains("subject"));
        c.subject = "leaf.groups".into();
        c.buffer = 0;
        assert!(c.check().unwrap_err().to_string().contains("buffer"));
        c.buffer = 1;
        c.ack_wait_s = f64::NAN;
        assert!(c.check().unwrap_err().to_string().contains("ack_wait_s"));
    }

    #[test]
    fn config_json_rejects_unknown_fields() {
        let e = serde_json::from_str::<ClusterConfig>(r#"{"url": "nats://h:1", "bufer": 3}"#)
            .unwrap_err();
        assert!(e.to_string().contains("bufer"), "{e}");
    }
}
