package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/jsonstr"
)

// Client frame types.
const (
	TypeJoin   = "join"
	TypeLeave  = "leave"
	TypeSend   = "send"
	TypeCancel = "cancel"
	TypePing   = "ping"
)

// MaxFrameIDLen is the longest client frame "id", in characters, echoed back.
const MaxFrameIDLen = 64

// After is a join's "I already have turn TurnID up to delta Seq".
type After struct {
	TurnID string `json:"turn_id"`
	Seq    int64  `json:"seq"`
}

// ClientFrame is any frame a client sends; which fields matter depends on
// Type.
type ClientFrame struct {
	Type           string `json:"type"`
	ID             string `json:"id,omitempty"`
	ConversationID string `json:"conversation_id,omitempty"`
	After          *After `json:"after,omitempty"`
	History        *int   `json:"history,omitempty"`
	Text           string `json:"text,omitempty"`
	MessageID      string `json:"message_id,omitempty"`
	TurnID         string `json:"turn_id,omitempty"`
	Model          string `json:"model,omitempty"`
}

// History limits of a join.
const (
	DefaultHistory = 50
	MaxHistory     = 500
)

// MaxSeq is the largest delta seq a cursor means as given: JavaScript's
// largest exact integer. A larger after.seq (or SSE Last-Event-ID) is read
// as MaxSeq, which is past the end of every turn as well.
const MaxSeq = 1<<53 - 1

// DecodeError is a frame that could not be accepted; ID is the frame's id
// when it could be read, so the error can be matched to the request.
type DecodeError struct {
	ID      string
	Message string
}

func (e *DecodeError) Error() string { return e.Message }

// idTooLong reports whether a frame id has more than MaxFrameIDLen
// characters (not bytes: "é" is one).
func idTooLong(id string) bool {
	return len(id) > MaxFrameIDLen && utf8.RuneCountInString(id) > MaxFrameIDLen
}

// DecodeClient parses and validates one client frame. Every failure is a
// *DecodeError meaning bad_request.
func DecodeClient(data []byte) (ClientFrame, error) {
	var f ClientFrame
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&f); err != nil {
		var id struct {
			ID any `json:"id"`
		}
		_ = json.Unmarshal(data, &id)
		s, _ := id.ID.(string)
		if idTooLong(s) {
			s = ""
		}
		return ClientFrame{}, &DecodeError{ID: s, Message: "invalid JSON frame: " + jsonErrText(err)}
	}
	if idTooLong(f.ID) {
		return ClientFrame{}, &DecodeError{Message: "id longer than 64 characters"}
	}
	if rest := bytes.TrimLeft(data[dec.InputOffset():], " \t\r\n"); len(rest) > 0 {
		return ClientFrame{}, &DecodeError{ID: f.ID, Message: "one JSON object per frame"}
	}
	bad := func(msg string) (ClientFrame, error) { return ClientFrame{}, &DecodeError{ID: f.ID, Message: msg} }
	checkID := func(field, v string, required bool) error {
		if v == "" {
			if required {
				return &DecodeError{ID: f.ID, Message: field + " is required"}
			}
			return nil
		}
		if !chat.ValidID(v) {
			return &DecodeError{ID: f.ID, Message: field + " must match ^[A-Za-z0-9_.:-]{1,128}$"}
		}
		return nil
	}
	switch f.Type {
	case TypeJoin:
		if err := checkID("conversation_id", f.ConversationID, true); err != nil {
			return ClientFrame{}, err
		}
		if f.History != nil && (*f.History < 0 || *f.History > MaxHistory) {
			return bad("history must be between 0 and 500")
		}
		if f.After != nil {
			if err := checkID("after.turn_id", f.After.TurnID, true); err != nil {
				return ClientFrame{}, err
			}
			if f.After.Seq < 0 {
				return bad("after.seq must not be negative")
			}
			// Past every turn's end all the same, and no sum overflows.
			f.After.Seq = min(f.After.Seq, MaxSeq)
		}
	case TypeLeave:
		if err := checkID("conversation_id", f.ConversationID, true); err != nil {
			return ClientFrame{}, err
		}
	case TypeSend:
		if err := checkID("conversation_id", f.ConversationID, true); err != nil {
			return ClientFrame{}, err
		}
		if err := checkID("message_id", f.MessageID, false); err != nil {
			return ClientFrame{}, err
		}
		if err := checkID("turn_id", f.TurnID, false); err != nil {
			return ClientFrame{}, err
		}
		if f.MessageID == "" || f.TurnID == "" {
			if field := emptyID(data); field != "" {
				return bad(field + " must match ^[A-Za-z0-9_.:-]{1,128}$")
			}
		}
		if f.Text == "" {
			return bad("text is required")
		}
		if !utf8.ValidString(f.Text) {
			return bad("text must be valid UTF-8")
		}
		if len(f.Model) > 256 {
			return bad("model name too long")
		}
	case TypeCancel:
		if err := checkID("turn_id", f.TurnID, true); err != nil {
			return ClientFrame{}, err
		}
	case TypePing:
	case "":
		return bad("type is required")
	default:
		return bad("unknown type " + strconv.Quote(truncate(f.Type, 32)))
	}
	return f, nil
}

// emptyID names the id of a send frame that is there but empty ("" matches
// no id, so it is refused like any other bad one), or is "". A frame that
// leaves an id out, or gives null, has the server make it.
func emptyID(data []byte) string {
	var ids struct {
		MessageID *string `json:"message_id"`
		TurnID    *string `json:"turn_id"`
	}
	_ = json.Unmarshal(data, &ids)
	switch {
	case ids.MessageID != nil && *ids.MessageID == "":
		return "message_id"
	case ids.TurnID != nil && *ids.TurnID == "":
		return "turn_id"
	}
	return ""
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

func jsonErrText(err error) string {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return fmt.Sprintf("syntax error at offset %d", se.Offset)
	case errors.As(err, &te):
		return fmt.Sprintf("field %s has the wrong type", te.Field)
	}
	return "cannot parse"
}

// Message is the wire form of a stored message.
type Message struct {
	MessageID      string          `json:"message_id"`
	ConversationID string          `json:"conversation_id"`
	Role           chat.Role       `json:"role"`
	Content        string          `json:"content"`
	Status         chat.TurnStatus `json:"status"`
	CreatedAt      string          `json:"created_at"`
	TurnID         string          `json:"turn_id,omitempty"`
	ReplyTo        string          `json:"reply_to,omitempty"`
	Model          string          `json:"model,omitempty"`
	Error          string          `json:"error,omitempty"`
	Usage          *chat.Usage     `json:"usage,omitempty"`
}

// TimeFormat is RFC 3339 with milliseconds, as created_at is written.
const TimeFormat = "2006-01-02T15:04:05.000Z07:00"

// FormatTime writes t in UTC with milliseconds.
func FormatTime(t time.Time) string { return t.UTC().Format(TimeFormat) }

// WireMessage converts a stored message.
func WireMessage(m chat.Message) Message {
	return Message{
		MessageID: m.ID, ConversationID: m.ConversationID, Role: m.Role, Content: m.Content,
		Status: m.Status, CreatedAt: FormatTime(m.CreatedAt), TurnID: m.TurnID, ReplyTo: m.ReplyTo,
		Model: m.Model, Error: m.Error, Usage: m.Usage,
	}
}

// ActiveTurn is joined.active.
type ActiveTurn struct {
	TurnID  string          `json:"turn_id"`
	ReplyTo string          `json:"reply_to"`
	Status  chat.TurnStatus `json:"status"`
	Seq     int64           `json:"seq"`
	From    int64           `json:"from,omitempty"` // set only when resuming with after
	Text    string          `json:"text"`
	Model   string          `json:"model"`
}

// Joined answers a join.
type Joined struct {
	Type           string      `json:"type"`
	ID             string      `json:"id,omitempty"`
	ConversationID string      `json:"conversation_id"`
	Messages       []Message   `json:"messages"`
	Active         *ActiveTurn `json:"active"`
}

// MessageFrame announces a stored user message.
type MessageFrame struct {
	Type           string  `json:"type"`
	ConversationID string  `json:"conversation_id"`
	Message        Message `json:"message"`
}

// TurnStart announces a new turn.
type TurnStart struct {
	Type           string `json:"type"`
	ConversationID string `json:"conversation_id"`
	TurnID         string `json:"turn_id"`
	ReplyTo        string `json:"reply_to"`
	Model          string `json:"model"`
}

// TurnEnd announces a turn's end.
type TurnEnd struct {
	Type           string          `json:"type"`
	ConversationID string          `json:"conversation_id"`
	TurnID         string          `json:"turn_id"`
	Seq            int64           `json:"seq"`
	Status         chat.TurnStatus `json:"status"`
	Error          string          `json:"error,omitempty"`
	Usage          *chat.Usage     `json:"usage,omitempty"`
}

// Ack answers a frame that carried an id. Fields beyond ID depend on the
// request.
type Ack struct {
	Type      string          `json:"type"`
	ID        string          `json:"id"`
	MessageID string          `json:"message_id,omitempty"`
	TurnID    string          `json:"turn_id,omitempty"`
	Status    chat.TurnStatus `json:"status,omitempty"`
	Already   *bool           `json:"already,omitempty"`
	// ConversationID is set on acks of join and leave.
	ConversationID string `json:"conversation_id,omitempty"`
}

// ErrorFrame reports a failed request.
type ErrorFrame struct {
	Type         string `json:"type"`
	ID           string `json:"id,omitempty"`
	Code         Code   `json:"code"`
	Message      string `json:"message"`
	TurnID       string `json:"turn_id,omitempty"`
	RetryAfterMS int64  `json:"retry_after_ms,omitempty"`
	// ConversationID names the conversation of an error that answers no
	// request (a conversation no longer joined).
	ConversationID string `json:"conversation_id,omitempty"`
}

// Encode marshals a frame; frames are plain structs, so it cannot fail for
// them, and a failure is reported as an internal error frame.
func Encode(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		return []byte(`{"type":"error","code":"internal","message":"encode frame"}`)
	}
	return b
}

// AppendDelta appends a turn.delta frame to dst without reflection: it is
// the hot path. from is omitted when it equals seq; ts when zero.
func AppendDelta(dst []byte, conv, turn string, from, seq int64, text []byte, ts int64) []byte {
	dst = append(dst, `{"type":"turn.delta","conversation_id":"`...)
	dst = append(dst, conv...) // ids are validated: no escaping needed
	dst = append(dst, `","turn_id":"`...)
	dst = append(dst, turn...)
	dst = append(dst, `","seq":`...)
	dst = strconv.AppendInt(dst, seq, 10)
	if from != seq {
		dst = append(dst, `,"from":`...)
		dst = strconv.AppendInt(dst, from, 10)
	}
	dst = append(dst, `,"text":`...)
	dst = AppendJSONString(dst, text)
	if ts != 0 {
		dst = append(dst, `,"ts":`...)
		dst = strconv.AppendInt(dst, ts, 10)
	}
	return append(dst, '}')
}

// AppendJSONString appends s as a JSON string (see [jsonstr.Append]).
func AppendJSONString(dst []byte, s []byte) []byte { return jsonstr.Append(dst, s) }
