-- +goose Up
-- Times are unix milliseconds (UTC). Keep in step with ../postgres.
CREATE TABLE conversations (
    id         TEXT   NOT NULL PRIMARY KEY,
    owner      TEXT   NOT NULL,
    title      TEXT   NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Conversations(owner) lists an owner's conversations newest first.
CREATE INDEX conversations_owner_updated ON conversations (owner, updated_at);

CREATE TABLE messages (
    -- position orders messages: a later insert always gets a larger value.
    position          INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id   TEXT   NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    id                TEXT   NOT NULL,
    role              TEXT   NOT NULL CHECK (role IN ('user', 'assistant')),
    content           TEXT   NOT NULL DEFAULT '',
    status            TEXT   NOT NULL CHECK (status IN ('queued', 'streaming', 'complete', 'cancelled', 'error', 'interrupted')),
    -- turn_id: the turn a user message started; an assistant message's own id.
    turn_id           TEXT   NOT NULL,
    -- reply_to: for an assistant message, the user message it answers.
    reply_to          TEXT   NOT NULL DEFAULT '',
    model             TEXT   NOT NULL DEFAULT '',
    error             TEXT   NOT NULL DEFAULT '',
    seq               BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT,
    created_at        BIGINT NOT NULL,
    finished_at       BIGINT,
    UNIQUE (conversation_id, id)
);

-- Messages pages through a conversation in position order.
CREATE INDEX messages_conversation_position ON messages (conversation_id, position);

-- The assistant message id is the turn id, unique across all conversations.
CREATE UNIQUE INDEX messages_turn ON messages (turn_id) WHERE role = 'assistant';

-- Active turns are few; this index finds a conversation's, an owner's (by a
-- join) or all of them without scanning history. Queries must repeat the
-- predicate verbatim for SQLite to use it.
CREATE INDEX messages_active ON messages (conversation_id)
    WHERE role = 'assistant' AND status IN ('queued', 'streaming');

-- +goose Down
DROP TABLE messages;
DROP TABLE conversations;
