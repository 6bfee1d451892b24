//! What a device should do about one desired model: a pure function of the desired entry and
//! local facts, so every rule (cohorts, downgrades, failed artifacts, rollbacks to a version
//! still on disk) is tested without a broker or a file system.

use std::collections::BTreeMap;

use tern_proto::{DesiredModel, DesiredState, FailureCode};

/// Local facts about one model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Local {
    /// The version served now (the highest on disk).
    pub active: Option<u32>,
    /// sha256 of the active version's artifact, when the fleet installed it.
    pub active_artifact: Option<[u8; 32]>,
    /// Versions that can be served again without a download (retired or older on disk), with
    /// the artifact each came from when the fleet installed it.
    pub restorable: Vec<(u32, Option<[u8; 32]>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to do: already there, or not this device's turn.
    Keep,
    /// Refuse the desired version, and say why.
    Refuse(FailureCode),
    /// Serve a version already on the device (a rollback).
    Restore(u32),
    /// Download, verify, install and validate this artifact.
    Fetch([u8; 32]),
}

pub fn plan(
    want: &DesiredModel,
    cohort: u8,
    local: &Local,
    failed: &BTreeMap<[u8; 32], FailureCode>,
) -> Plan {
    // Cohorts are 0..100, so 100% takes every device and 0% none.
    if cohort >= want.percent {
        return Plan::Keep;
    }
    if local.active == Some(want.version)
        && local.active_artifact.is_none_or(|a| a == want.artifact)
    {
        return Plan::Keep;
    }
    // Failed under this desired state already; a new push or rollout retries it.
    if failed.contains_key(&want.artifact) {
        return Plan::Keep;
    }
    let older = local.active.is_some_and(|a| want.version < a);
    if older && !want.allow_downgrade {
        return Plan::Refuse(FailureCode::Downgrade);
    }
    // Only bytes known to be the desired artifact are brought back; anything else is fetched.
    if local
        .restorable
        .contains(&(want.version, Some(want.artifact)))
    {
        return Plan::Restore(want.version);
    }
    Plan::Fetch(want.artifact)
}

/// The fleet-wide state with this device's overrides applied model by model.
pub fn merge(fleet: Option<&DesiredState>, device: Option<&DesiredState>) -> Vec<DesiredModel> {
    let mut out: Vec<DesiredModel> = fleet.map(|f| f.models.to_vec()).unwrap_or_default();
    for m in device.map(|d| d.models.iter()).into_iter().flatten() {
        match out.iter_mut().find(|o| o.name == m.name) {
            Some(o) => *o = m.clone(),
            None => out.push(m.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(version: u32, artifact: u8, percent: u8, allow_downgrade: bool) -> DesiredModel {
        DesiredModel {
            name: "m".try_into().unwrap(),
            version,
            artifact: [artifact; 32],
            percent,
            allow_downgrade,
        }
    }

    fn active(v: u32, artifact: u8) -> Local {
        Local {
            active: Some(v),
            active_artifact: Some([artifact; 32]),
            restorable: vec![],
        }
    }

    #[test]
    fn a_newer_version_is_fetched() {
        assert_eq!(
            plan(&want(2, 2, 100, false), 50, &active(1, 1), &BTreeMap::new()),
            Plan::Fetch([2; 32])
        );
        assert_eq!(
            plan(
                &want(1, 1, 100, false),
                50,
                &Local::default(),
                &BTreeMap::new()
            ),
            Plan::Fetch([1; 32])
        );
    }

    #[test]
    fn the_served_version_is_kept() {
        assert_eq!(
            plan(&want(2, 2, 100, false), 0, &active(2, 2), &BTreeMap::new()),
            Plan::Keep
        );
    }

    #[test]
    fn only_the_cohort_below_the_percentage_takes_a_staged_rollout() {
        let w = want(2, 2, 50, false);
        assert_eq!(
            plan(&w, 49, &active(1, 1), &BTreeMap::new()),
            Plan::Fetch([2; 32])
        );
        assert_eq!(plan(&w, 50, &active(1, 1), &BTreeMap::new()), Plan::Keep);
        assert_eq!(
            plan(&want(2, 2, 0, false), 0, &active(1, 1), &BTreeMap::new()),
            Plan::Keep
        );
    }

    #[test]
    fn a_downgrade_is_refused_unless_ordered() {
        assert_eq!(
            plan(&want(1, 1, 100, false), 0, &active(2, 2), &BTreeMap::new()),
            Plan::Refuse(FailureCode::Downgrade)
        );
        assert_eq!(
            plan(&want(1, 1, 100, true), 0, &active(2, 2), &BTreeMap::new()),
            Plan::Fetch([1; 32])
        );
    }

    #[test]
    fn an_ordered_rollback_to_a_version_on_disk_downloads_nothing() {
        let mut local = active(2, 2);
        local.restorable = vec![(1, Some([1; 32]))];
        assert_eq!(
            plan(&want(1, 1, 100, true), 0, &local, &BTreeMap::new()),
            Plan::Restore(1)
        );
        // Forward again to a version that was retired: also no download.
        let mut local = active(1, 1);
        local.restorable = vec![(2, Some([2; 32]))];
        assert_eq!(
            plan(&want(2, 2, 100, false), 0, &local, &BTreeMap::new()),
            Plan::Restore(2)
        );
    }

    #[test]
    fn a_version_on_disk_with_other_or_unknown_bytes_is_fetched() {
        let mut local = active(2, 2);
        local.restorable = vec![(1, None), (1, Some([9; 32]))];
        assert_eq!(
            plan(&want(1, 1, 100, true), 0, &local, &BTreeMap::new()),
            Plan::Fetch([1; 32])
        );
    }

    #[test]
    fn an_artifact_that_failed_is_not_retried() {
        let failed = BTreeMap::from([([2u8; 32], FailureCode::HashMismatch)]);
        assert_eq!(
            plan(&want(2, 2, 100, false), 0, &active(1, 1), &failed),
            Plan::Keep
        );
    }

    #[test]
    fn the_same_version_with_other_bytes_is_fetched() {
        assert_eq!(
            plan(&want(2, 3, 100, false), 0, &active(2, 2), &BTreeMap::new()),
            Plan::Fetch([3; 32])
        );
    }

    #[test]
    fn device_overrides_replace_fleet_entries_by_name() {
        let fleet = DesiredState {
            generation: 1,
            models: [want(1, 1, 100, false)].into_iter().collect(),
        };
        let mut other = want(3, 3, 100, false);
        other.name = "n".try_into().unwrap();
        let device = DesiredState {
            generation: 1,
            models: [want(2, 2, 100, false), other].into_iter().collect(),
        };
        let merged = merge(Some(&fleet), Some(&device));
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].version, 2);
        assert_eq!(merged[1].name.as_str(), "n");
    }
}
