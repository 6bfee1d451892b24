//! Fleet membership over MQTT: signed model updates pulled from retained topics, reports,
//! telemetry and inference requests. The broker is the only server; see `core/proto/SPEC.md`.
//!
//! Layers: [`plan`] decides (pure), [`tern_update`] verifies and installs (files), [`validate`]
//! runs a candidate, `agent` drives them from MQTT events, and the repository hot-swaps.

mod agent;
mod infer;
pub mod plan;
pub mod topics;
pub use tern_update::validate;

use std::time::Duration;

use rumqttc::v5::MqttOptions;

pub use agent::start;
pub use topics::Topics;

/// Why fleet membership could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("invalid MQTT URL `{0}`: expected mqtt://HOST[:PORT]")]
    Url(String),
    #[error("invalid {what} `{value}`: use 1 to 32 letters, digits, `_`, `-`, `.`")]
    Id { what: &'static str, value: String },
    #[error(
        "no trusted keys: signed manifests are required; give --trust-key FILE (from `tern keygen`)"
    )]
    NoTrustedKeys,
    #[error(transparent)]
    Keys(#[from] tern_update::UpdateError),
}

/// Broker host and port from `mqtt://HOST[:PORT]` (also `tcp://`, or a bare `HOST:PORT`).
pub fn parse_url(url: &str) -> Result<(String, u16), FleetError> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .unwrap_or(url);
    let rest = rest.trim_end_matches('/');
    let bad = || FleetError::Url(url.into());
    if rest.is_empty() || rest.contains('/') || rest.contains("://") {
        return Err(bad());
    }
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => {
            Ok((host.into(), port.parse().map_err(|_| bad())?))
        }
        Some(_) => Err(bad()),
        None => Ok((rest.into(), 1883)),
    }
}

/// MQTT 5 options for Tern's clients: persistent session when `persistent`, and a packet limit
/// large enough for chunks (rumqttc's default of 10 KiB is not).
pub fn mqtt_options(
    url: &str,
    client_id: &str,
    max_packet_bytes: u32,
    persistent: bool,
    credentials: Option<(&str, &str)>,
) -> Result<MqttOptions, FleetError> {
    let (host, port) = parse_url(url)?;
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(15))
        .set_max_packet_size(Some(max_packet_bytes))
        .set_connection_timeout(5);
    if persistent {
        // Both are needed for the broker to keep the session across reconnects.
        o.set_clean_start(false)
            .set_session_expiry_interval(Some(7 * 24 * 3600));
    }
    if let Some((user, password)) = credentials {
        o.set_credentials(user, password);
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_with_a_default_port() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(parse_url("mqtt://broker").unwrap(), ("broker".into(), 1883));
        assert_eq!(parse_url("localhost:9").unwrap(), ("localhost".into(), 9));
        for bad in ["", "mqtt://", "mqtt://h:x", "http://h/x", "mqtt://:1"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
