//! Who is calling (DESIGN §3.1 "Auth").
//!
//! * The token comes from `Authorization: Bearer <token>` or upstream's `X-Tandem-Token`.
//! * `TANDEM_API_TOKEN` is one admin token (a human operator; any tenant). Tenant headers
//!   (`x-tandem-org-id`, `x-tandem-workspace-id`) narrow it to one tenant, and
//!   `x-tandem-actor-id` names the actor.
//! * Other tokens live in `api_tokens`, stored as their SHA-256: each is bound to one tenant and
//!   a principal kind (`human`, `agent`, `system`). Tenant headers naming another tenant are
//!   refused (403); resources of another tenant answer 404, as upstream.
//! * `x-tandem-request-source: agent` (with `x-tandem-agent-id`) marks a request made in an
//!   agent's context: it can only narrow a human principal to an agent, never the reverse.
//! * `x-tandem-channel: slack|discord|telegram` with `x-tandem-channel-user: <id>`, sent by the
//!   admin token or a `system` token (a channel bridge), decides as that channel-verified human
//!   (upstream's channel interaction handlers).
//! * `TANDEM_API_DEV_MODE=1`: requests without a token act as a local human admin. For local
//!   development only; a token, when given, is still checked.

use axum::{extract::FromRequestParts, http::HeaderMap, http::request::Parts};
use sha2::{Digest, Sha256};
use tandem_core::{ActorKind, GovernanceActorRef, TenantContext};

use crate::{ApiError, AppState};

/// Authentication settings of the API.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Hex SHA-256 of `TANDEM_API_TOKEN`.
    pub admin_token_hash: Option<String>,
    /// `TANDEM_API_DEV_MODE`: no token needed.
    pub dev_mode: bool,
}

impl AuthConfig {
    pub fn new(admin_token: Option<&str>, dev_mode: bool) -> Self {
        Self {
            admin_token_hash: admin_token
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(hash_token),
            dev_mode,
        }
    }
}

/// Hex SHA-256 of a token: how tokens are stored and compared.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub kind: ActorKind,
    pub actor_id: Option<String>,
    pub source: Option<String>,
    /// The admin token or dev mode: may see every tenant unless narrowed, and manage tokens.
    pub admin: bool,
    /// Tenant scope (`None` = any), from a tenant-bound token or the narrowing headers.
    pub org_id: Option<String>,
    pub workspace_id: Option<String>,
    /// A tenant-bound token: a verified (strict) tenant context.
    pub verified_tenant: bool,
    /// Verified reviewer authority for governed gates.
    pub gate_reviewer: bool,
    /// A tenant-bound token that may act on every automation of its tenant.
    pub tenant_admin: bool,
}

impl Principal {
    /// Whether a resource of this tenant is visible (otherwise: 404).
    pub fn can_see(&self, tenant: &TenantContext) -> bool {
        self.org_id.as_deref().is_none_or(|o| o == tenant.org_id)
            && self
                .workspace_id
                .as_deref()
                .is_none_or(|w| w == tenant.workspace_id)
    }

    /// The decider of a gate decision.
    pub fn actor_ref(&self) -> GovernanceActorRef {
        GovernanceActorRef {
            kind: self.kind,
            actor_id: self.actor_id.clone(),
            source: self.source.clone(),
        }
    }

    /// The tenant new automations get when their spec names none: the principal's, explicit;
    /// local-implicit for an unscoped admin.
    pub fn default_tenant(&self) -> Option<TenantContext> {
        match (&self.org_id, &self.workspace_id) {
            (Some(o), Some(w)) => Some(TenantContext::explicit(o, w)),
            _ => None,
        }
    }

    /// Spec §4.2 step 4: the owner of the automation (its `creator_id`, compared
    /// case-insensitively) or an admin may act on its gates. Admins are the admin token, dev
    /// mode, a tenant-admin token, and a gate-reviewer token (reviewing other people's
    /// automations is what it is for).
    pub fn owns_or_administers(&self, automation: &tandem_core::AutomationV2Spec) -> bool {
        self.admin
            || self.tenant_admin
            || self.gate_reviewer
            || self.actor_id.as_deref().is_some_and(|a| {
                let owner = automation.creator_id.trim();
                !owner.is_empty() && a.trim().eq_ignore_ascii_case(owner)
            })
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "ADMIN_REQUIRED",
                "this route needs the admin token",
            ))
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().map_err(|_| {
                ApiError::bad_request(
                    "INVALID_HEADER",
                    format!("header {name} is not visible ASCII"),
                )
            })?;
            let s = s.trim();
            if s.is_empty() {
                return Ok(None);
            }
            if s.len() > 256 {
                return Err(ApiError::bad_request(
                    "INVALID_HEADER",
                    format!("header {name} is longer than 256 characters"),
                ));
            }
            Ok(Some(s))
        }
    }
}

fn token_of(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
        let s = v
            .to_str()
            .map_err(|_| ApiError::unauthorized("malformed Authorization header"))?;
        let token = s
            .strip_prefix("Bearer ")
            .or_else(|| s.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::unauthorized("Authorization must be `Bearer <token>`"))?;
        return Ok(Some(token));
    }
    if let Some(v) = headers.get("x-tandem-token") {
        let s = v
            .to_str()
            .map_err(|_| ApiError::unauthorized("malformed X-Tandem-Token header"))?
            .trim();
        if !s.is_empty() {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// Constant-time comparison of two hex digests.
fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let result = authenticate(&parts.headers, state).await;
        if result.is_err() {
            metrics::counter!("tandem_api_auth_failures_total").increment(1);
        }
        result
    }
}

/// Resolves the caller from the request headers.
pub async fn authenticate(headers: &HeaderMap, state: &AppState) -> Result<Principal, ApiError> {
    let auth = &state.inner.auth;
    let org_h = header(headers, "x-tandem-org-id")?;
    let ws_h = header(headers, "x-tandem-workspace-id")?;
    let actor_h = header(headers, "x-tandem-actor-id")?;
    let mut principal = match token_of(headers)? {
        None if auth.dev_mode => Principal {
            kind: ActorKind::Human,
            actor_id: Some("local-dev".into()),
            source: None,
            admin: true,
            org_id: None,
            workspace_id: None,
            verified_tenant: false,
            gate_reviewer: false,
            tenant_admin: false,
        },
        None => {
            return Err(ApiError::unauthorized(
                "missing token: send `Authorization: Bearer <token>` or `X-Tandem-Token`",
            ));
        }
        Some(token) => {
            let hash = hash_token(token);
            if auth
                .admin_token_hash
                .as_deref()
                .is_some_and(|h| same_digest(h, &hash))
            {
                Principal {
                    kind: ActorKind::Human,
                    actor_id: Some("admin".into()),
                    source: None,
                    admin: true,
                    org_id: None,
                    workspace_id: None,
                    verified_tenant: false,
                    gate_reviewer: false,
                    tenant_admin: false,
                }
            } else {
                let stored = tandem_store::find_api_token(&state.inner.pool, &hash)
                    .await?
                    .ok_or_else(|| ApiError::unauthorized("unknown or revoked token"))?;
                Principal {
                    kind: stored.principal_kind,
                    actor_id: stored.actor_id,
                    source: None,
                    admin: false,
                    org_id: Some(stored.org_id),
                    workspace_id: Some(stored.workspace_id),
                    verified_tenant: true,
                    gate_reviewer: stored.gate_reviewer,
                    tenant_admin: stored.tenant_admin,
                }
            }
        }
    };
    // Tenant headers narrow; they never widen.
    for (h, slot) in [
        (org_h, &mut principal.org_id),
        (ws_h, &mut principal.workspace_id),
    ] {
        if let Some(h) = h {
            match slot {
                Some(bound) if bound != h => {
                    return Err(ApiError::forbidden(
                        "TENANT_SCOPE_DENIED",
                        "tenant headers cannot name another tenant than the token's",
                    ));
                }
                _ => *slot = Some(h.to_owned()),
            }
        }
    }
    if let Some(a) = actor_h
        && (principal.admin || principal.actor_id.is_none())
    {
        principal.actor_id = Some(a.to_owned());
    }
    let source = header(headers, "x-tandem-request-source")?.map(str::to_ascii_lowercase);
    if source.as_deref() == Some("agent") && principal.kind == ActorKind::Human {
        principal.kind = ActorKind::Agent;
        if let Some(agent) = header(headers, "x-tandem-agent-id")? {
            principal.actor_id = Some(agent.to_owned());
        }
        principal.source = Some("agent".into());
    }
    // A channel bridge (the admin token or a system token) decides on behalf of the
    // channel-verified human who clicked (upstream's Slack/Discord/Telegram handlers).
    if let Some(channel) = header(headers, "x-tandem-channel")? {
        if !(principal.admin || principal.kind == ActorKind::System) {
            return Err(ApiError::forbidden(
                "CHANNEL_BRIDGE_REQUIRED",
                "only the admin token or a system token may act for a channel user",
            ));
        }
        let channel = channel.to_ascii_lowercase();
        if !CHANNELS.contains(&channel.as_str()) {
            return Err(ApiError::bad_request(
                "INVALID_HEADER",
                "x-tandem-channel must be slack, discord or telegram",
            ));
        }
        let user = header(headers, "x-tandem-channel-user")?.ok_or_else(|| {
            ApiError::bad_request(
                "INVALID_HEADER",
                "x-tandem-channel needs x-tandem-channel-user",
            )
        })?;
        principal.kind = ActorKind::Human;
        principal.actor_id = Some(user.to_owned());
        principal.source = Some(channel);
    }
    Ok(principal)
}

/// Channels whose users are verified by the channel itself.
pub const CHANNELS: [&str; 3] = ["slack", "discord", "telegram"];
