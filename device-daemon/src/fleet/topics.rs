//! The topic tree of one fleet (SPEC.md, "Topics").

use tern_proto::Sha256;

/// Fleet names and device ids become topic levels: no wildcards, no separators.
pub fn valid_id(id: &str) -> bool {
    tern_update::valid_name(id) && id.len() <= tern_proto::NAME_LEN
}

#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
    fleet: String,
}

impl Topics {
    pub fn new(fleet: &str) -> Topics {
        Topics {
            prefix: format!("tern/v1/{fleet}"),
            fleet: fleet.into(),
        }
    }

    pub fn desired(&self) -> String {
        format!("{}/desired", self.prefix)
    }

    pub fn device_desired(&self, device: &str) -> String {
        format!("{}/devices/{device}/desired", self.prefix)
    }

    pub fn reported(&self, device: &str) -> String {
        format!("{}/devices/{device}/reported", self.prefix)
    }

    /// Every device's report, for `tern status`.
    pub fn all_reported(&self) -> String {
        format!("{}/devices/+/reported", self.prefix)
    }

    pub fn telemetry(&self, device: &str) -> String {
        format!("{}/devices/{device}/telemetry", self.prefix)
    }

    pub fn artifact(&self, sha: &Sha256) -> String {
        format!("{}/artifacts/{}", self.prefix, tern_update::hex(sha))
    }

    pub fn manifest(&self, sha: &Sha256) -> String {
        format!("{}/manifest", self.artifact(sha))
    }

    /// Every retained manifest, for `tern rollback` and `tern gc`.
    pub fn all_manifests(&self) -> String {
        format!("{}/artifacts/+/manifest", self.prefix)
    }

    pub fn selftest(&self, sha: &Sha256) -> String {
        format!("{}/selftest", self.artifact(sha))
    }

    pub fn chunk(&self, sha: &Sha256, index: u32) -> String {
        format!("{}/chunks/{index}", self.artifact(sha))
    }

    /// Requests addressed to one device, any model.
    pub fn device_infer_filter(&self, device: &str) -> String {
        format!("{}/devices/{device}/infer/+", self.prefix)
    }

    /// Requests for whichever device of the group takes them (MQTT 5 shared subscription).
    pub fn shared_infer_filter(&self) -> String {
        format!("$share/tern-{}/{}/infer/+", self.fleet, self.prefix)
    }

    pub fn shared_infer(&self, model: &str) -> String {
        format!("{}/infer/{model}", self.prefix)
    }

    pub fn device_infer(&self, device: &str, model: &str) -> String {
        format!("{}/devices/{device}/infer/{model}", self.prefix)
    }

    /// The model named by an inference topic of this fleet.
    pub fn infer_model<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let model = match rest.strip_prefix("infer/") {
            Some(m) => m,
            None => rest
                .strip_prefix("devices/")?
                .split_once('/')?
                .1
                .strip_prefix("infer/")?,
        };
        (!model.contains('/')).then_some(model)
    }

    /// The device id in a `.../devices/{id}/reported` topic.
    pub fn reporting_device<'t>(&self, topic: &'t str) -> Option<&'t str> {
        topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/devices/")?
            .strip_suffix("/reported")
    }

    /// The artifact digest in a `.../artifacts/{sha}/...` topic.
    pub fn artifact_of(&self, topic: &str) -> Option<Sha256> {
        let rest = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/artifacts/")?;
        let hex = rest.split('/').next()?;
        let mut sha = [0u8; 32];
        ::hex::decode_to_slice(hex, &mut sha).ok()?;
        Some(sha)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_topics_name_their_model() {
        let t = Topics::new("f");
        assert_eq!(t.infer_model("tern/v1/f/infer/digits"), Some("digits"));
        assert_eq!(t.infer_model(&t.device_infer("d1", "m")), Some("m"));
        assert_eq!(t.infer_model("tern/v1/g/infer/digits"), None);
        assert_eq!(t.infer_model("tern/v1/f/infer/a/b"), None);
    }

    #[test]
    fn artifact_topics_carry_the_digest() {
        let t = Topics::new("f");
        let sha = [0xab; 32];
        assert_eq!(t.artifact_of(&t.chunk(&sha, 7)), Some(sha));
        assert_eq!(t.artifact_of(&t.manifest(&sha)), Some(sha));
        assert_eq!(t.artifact_of("tern/v1/f/artifacts/zz/manifest"), None);
        assert_eq!(t.reporting_device(&t.reported("dev-1")), Some("dev-1"));
    }

    #[test]
    fn ids_cannot_hold_topic_syntax() {
        for bad in ["a/b", "+", "#", "", "$sys", ".x"] {
            assert!(!valid_id(bad), "{bad}");
        }
        assert!(valid_id("device-01"));
    }
}
