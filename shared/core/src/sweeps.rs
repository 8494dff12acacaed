//! Sweeps on runs (spec §3.2, §3.6–§3.9, §3.12).

use crate::model::AutomationV2RunRecord;

/// `refresh_stale_running_detail` (spec §3.2).
pub fn refresh_stale_running_detail(_run: &mut AutomationV2RunRecord) {}
