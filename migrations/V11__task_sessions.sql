-- A session's requests find their task by the session id in its host name.
CREATE INDEX tasks_session_id ON tasks ((spec->'session'->>'id')) WHERE spec ? 'session';
