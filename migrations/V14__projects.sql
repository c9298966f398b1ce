-- Projects as aggregates (events ud.auth.project.<project>.*): members and
-- their roles. Tokens may belong to a user and expire.
CREATE TABLE projects (
    name         text PRIMARY KEY,
    description  text        NOT NULL,
    created_at   timestamptz NOT NULL,
    created_by   text        NOT NULL,
    archived_at  timestamptz
);

CREATE TABLE project_members (
    project    text        NOT NULL,
    user_name  text        NOT NULL,
    role       text        NOT NULL, -- viewer, member or owner
    since      timestamptz NOT NULL, -- when the member got this role
    PRIMARY KEY (project, user_name)
);
CREATE INDEX project_members_user ON project_members (user_name);

ALTER TABLE api_tokens ADD COLUMN user_name text;
ALTER TABLE api_tokens ADD COLUMN expires_at timestamptz;
CREATE INDEX api_tokens_user ON api_tokens (user_name) WHERE user_name IS NOT NULL;

-- When a token was last used, written by the gateway (at most once a
-- minute per token), not derived from events: a rebuild starts it afresh.
CREATE TABLE token_use (
    token_id      uuid PRIMARY KEY,
    last_used_at  timestamptz NOT NULL
);
