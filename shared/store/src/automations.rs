//! Automation definitions.

use crate::StoreError;
use crate::convert::ms_to_db;
use deadpool_postgres::Pool;
use tandem_core::{AutomationStatus, AutomationV2Spec};

fn status_str(s: AutomationStatus) -> &'static str {
    match s {
        AutomationStatus::Active => "active",
        AutomationStatus::Paused => "paused",
        AutomationStatus::Draft => "draft",
    }
}

const UPSERT: &str = "
    INSERT INTO automations (automation_id, org_id, workspace_id, status, spec, created_at_ms,
                             updated_at_ms)
    VALUES ($1, $2, $3, $4, $5, $6, $7)";

async fn write(pool: &Pool, spec: &AutomationV2Spec, upsert: bool) -> Result<(), StoreError> {
    let tenant = spec.tenant_context();
    let doc = serde_json::to_value(spec)?;
    let created = ms_to_db(spec.created_at_ms, "created_at_ms")?;
    let updated = ms_to_db(spec.updated_at_ms, "updated_at_ms")?;
    let sql = if upsert {
        format!(
            "{UPSERT} ON CONFLICT (automation_id) DO UPDATE SET
                 org_id = EXCLUDED.org_id, workspace_id = EXCLUDED.workspace_id,
                 status = EXCLUDED.status, spec = EXCLUDED.spec,
                 updated_at_ms = EXCLUDED.updated_at_ms"
        )
    } else {
        UPSERT.to_owned()
    };
    let client = pool.get().await?;
    let stmt = client.prepare_cached(&sql).await?;
    client
        .execute(
            &stmt,
            &[
                &spec.automation_id,
                &tenant.org_id,
                &tenant.workspace_id,
                &status_str(spec.status),
                &doc,
                &created,
                &updated,
            ],
        )
        .await?;
    Ok(())
}

/// Inserts a new automation; an existing id is a [`StoreError::Conflict`].
pub async fn insert_automation(pool: &Pool, spec: &AutomationV2Spec) -> Result<(), StoreError> {
    write(pool, spec, false).await
}

/// Inserts or replaces an automation (its original `created_at_ms` is kept).
pub async fn upsert_automation(pool: &Pool, spec: &AutomationV2Spec) -> Result<(), StoreError> {
    write(pool, spec, true).await
}

/// The automation; [`StoreError::NotFound`] when absent.
pub async fn get_automation(
    pool: &Pool,
    automation_id: &str,
) -> Result<AutomationV2Spec, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached("SELECT spec FROM automations WHERE automation_id = $1")
        .await?;
    let row = client
        .query_opt(&stmt, &[&automation_id])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("automation {automation_id}")))?;
    Ok(serde_json::from_value(row.try_get(0)?)?)
}

/// Automations of one tenant, by id.
pub async fn list_automations(
    pool: &Pool,
    org_id: &str,
    workspace_id: &str,
    limit: usize,
) -> Result<Vec<AutomationV2Spec>, StoreError> {
    let client = pool.get().await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "SELECT spec FROM automations WHERE org_id = $1 AND workspace_id = $2
              ORDER BY automation_id LIMIT $3",
            &[&org_id, &workspace_id, &limit],
        )
        .await?;
    rows.iter()
        .map(|r| Ok(serde_json::from_value(r.try_get(0)?)?))
        .collect()
}
