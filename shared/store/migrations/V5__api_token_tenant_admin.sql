-- Tenant administrators (spec §4.2 step 4, "owner or admin"): a tenant-bound token may act on
-- every automation of its tenant, not only the automations its actor created.
ALTER TABLE api_tokens ADD COLUMN tenant_admin boolean NOT NULL DEFAULT false;
