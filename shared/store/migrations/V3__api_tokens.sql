-- API tokens of tandem-api (DESIGN §3.1 "Auth"). Only the hex SHA-256 of a token is stored; the
-- token itself is shown once, when it is created. A token is bound to one tenant (org,
-- workspace) and a principal kind; `admin` tokens may act on every automation of their tenant.
CREATE TABLE api_tokens (
    token_hash      text         PRIMARY KEY CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    name            text         NOT NULL,
    org_id          text         NOT NULL,
    workspace_id    text         NOT NULL,
    principal_kind  text         NOT NULL CHECK (principal_kind IN ('human', 'agent', 'system')),
    actor_id        text,
    gate_reviewer   boolean      NOT NULL DEFAULT false,
    created_at      timestamptz  NOT NULL DEFAULT now(),
    revoked_at      timestamptz
);
CREATE INDEX api_tokens_tenant_idx ON api_tokens (org_id, workspace_id);
