-- +goose Up
-- The turn ids of deleted conversations. A turn id also names the turn's
-- events, snapshot and job on the bus, which outlive its rows, so a send may
-- not take the id of a deleted turn again: its watchers would be given the
-- old turn's events. deleted_at is unix milliseconds (UTC).
CREATE TABLE deleted_turns (
    turn_id    TEXT   NOT NULL PRIMARY KEY,
    deleted_at BIGINT NOT NULL
);

-- +goose Down
DROP TABLE deleted_turns;
