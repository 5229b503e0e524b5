package bus

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// Event is one event of a turn, as carried on tr.ev.<conv>.<turn>.<kind>.
// Which fields are set depends on Kind.
type Event struct {
	Kind           string `json:"-"`
	ConversationID string `json:"-"`
	TurnID         string `json:"-"`

	// KindStart: the user message and the turn it started, and the
	// conversation's owner, whom views of another user do not follow (a
	// conversation deleted and then taken by another user keeps its id).
	Message *WireMessage `json:"m,omitempty"`
	ReplyTo string       `json:"r,omitempty"`
	Model   string       `json:"mo,omitempty"`
	Owner   string       `json:"ow,omitempty"`

	// KindDelta: delta Seq, whose text starts at byte Off of the turn's text.
	// KindEnd: Seq is the last delta's seq.
	Seq  int64  `json:"q,omitempty"`
	Off  int64  `json:"o,omitempty"`
	Text string `json:"x,omitempty"`
	TS   int64  `json:"ts,omitempty"` // Unix µs when the producer emitted the delta

	// KindEnd.
	Status chat.TurnStatus `json:"st,omitempty"`
	Error  string          `json:"er,omitempty"`
	Usage  *chat.Usage     `json:"u,omitempty"`

	// StreamSeq is the event's sequence in the events stream when it was
	// read from or acknowledged by JetStream; 0 for a live core delivery.
	StreamSeq uint64 `json:"-"`
}

// WireMessage is a stored message as carried in a start event.
type WireMessage struct {
	ID        string `json:"id"`
	Content   string `json:"c"`
	CreatedAt int64  `json:"t"` // Unix ms
}

// MsgID is the Nats-Msg-Id that makes a retried publish of the event a no-op.
// A delta has none (see PublishEvent).
func (e *Event) MsgID() string {
	if e.Kind == KindDelta {
		return ""
	}
	return e.TurnID + ":" + e.Kind
}

// Subject is where the event is announced live.
func (e *Event) Subject() string {
	return EventSubject(e.ConversationID, e.TurnID, e.Kind)
}

// StoredSubject is where the event is stored.
func (e *Event) StoredSubject() string {
	return StoredSubject(e.ConversationID, e.TurnID, e.Kind)
}

// UserMessage rebuilds the user message a start event carries.
func (e *Event) UserMessage() chat.Message {
	m := chat.Message{
		ConversationID: e.ConversationID,
		Role:           chat.RoleUser,
		Status:         chat.StatusComplete,
		TurnID:         e.TurnID,
	}
	if e.Message != nil {
		m.ID = e.Message.ID
		m.Content = e.Message.Content
		m.CreatedAt = time.UnixMilli(e.Message.CreatedAt).UTC()
	}
	return m
}

// DecodeEvent parses an event from its subject and payload.
func DecodeEvent(subject string, data []byte) (Event, error) {
	conv, turn, kind, ok := parseEventSubject(subject)
	if !ok {
		return Event{}, fmt.Errorf("decode event: bad subject %q", subject)
	}
	var e Event
	if kind != KindDelta || !decodeDelta(data, &e) {
		e = Event{}
		if err := json.Unmarshal(data, &e); err != nil {
			return Event{}, fmt.Errorf("decode event: %w", err)
		}
	}
	e.Kind, e.ConversationID, e.TurnID = kind, conv, turn
	return e, nil
}

// encode returns the event's JSON.
func (e *Event) encode() ([]byte, error) {
	if e.Kind == KindDelta {
		return e.encodeDelta(), nil
	}
	return json.Marshal(e)
}

// encodeDelta returns the delta's encoding, in a buffer of its own.
func (e *Event) encodeDelta() []byte {
	return appendDelta(make([]byte, 0, 48+len(e.Text)), e)
}
