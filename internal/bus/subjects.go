package bus

import "strings"

// Subjects and names. An id may hold '.' and ':' (PROTOCOL.md
// "Identifiers"); Token maps it into one subject token and KV key segment.
const (
	JobSubject = "tr.job"
	// Events are stored under tr.evs.… and, once the stream has
	// acknowledged them, announced live under tr.ev.…: a live subscriber
	// never sees an event the stream could still lose.
	storedPrefix   = "tr.evs."
	eventPrefix    = "tr.ev."
	WorkerPingSubj = "tr.workers.ping"
	// producingPrefix + the turn's token asks the workers whether one of
	// them produces the turn (see ProducerAlive).
	producingPrefix = "tr.workers.producing."
	// CancelSubj carries a cancelled turn's id as a core NATS signal, next to
	// its durable tombstone (see MarkCancelled).
	CancelSubj = "tr.cancel"

	EventsStream = "TR_EVENTS"
	JobsStream   = "TR_JOBS"
	JobsConsumer = "workers"
	TurnsBucket  = "TR_TURNS"
	CancelBucket = "TR_CANCELS"
)

// Event kinds, the last token of an event subject.
const (
	KindStart = "s" // user message stored and turn created
	KindDelta = "d"
	KindEnd   = "e"
	// KindGone: the conversation was deleted. It is announced live only,
	// under the turn token goneTurn, which no id maps to.
	KindGone = "x"
)

// goneTurn stands for the turn in a KindGone event's subject: '!' is in no
// Token.
const goneTurn = "!"

var tokenReplacer = strings.NewReplacer(".", "/", ":", "=")
var untokenReplacer = strings.NewReplacer("/", ".", "=", ":")

// Token maps a valid id (chat.ValidID) to a string usable as one NATS subject
// token and as a KV key: '.' becomes '/' and ':' becomes '='. Neither
// replacement is a valid id character, so the mapping is reversible.
func Token(id string) string { return tokenReplacer.Replace(id) }

// Untoken reverses Token.
func Untoken(tok string) string { return untokenReplacer.Replace(tok) }

// EventSubject is the subject of one kind of event of a turn.
func EventSubject(conversationID, turnID, kind string) string {
	return eventPrefix + Token(conversationID) + "." + Token(turnID) + "." + kind
}

// anyTurnEndSubject matches the end event of turn turnID in any
// conversation.
func anyTurnEndSubject(turnID string) string {
	return eventPrefix + "*." + Token(turnID) + "." + KindEnd
}

// ConversationSubject matches every event of a conversation.
func ConversationSubject(conversationID string) string {
	return eventPrefix + Token(conversationID) + ".>"
}

// StoredSubject is where an event is stored in the events stream; it is
// announced live under EventSubject.
func StoredSubject(conversationID, turnID, kind string) string {
	return storedPrefix + Token(conversationID) + "." + Token(turnID) + "." + kind
}

// TurnSubject matches every stored event of one turn.
func TurnSubject(conversationID, turnID string) string {
	return storedPrefix + Token(conversationID) + "." + Token(turnID) + ".*"
}

// parseEventSubject splits tr.ev.<conv>.<turn>.<kind> (or tr.evs.…).
func parseEventSubject(subj string) (conv, turn, kind string, ok bool) {
	rest, found := strings.CutPrefix(subj, eventPrefix)
	if !found {
		if rest, found = strings.CutPrefix(subj, storedPrefix); !found {
			return "", "", "", false
		}
	}
	parts := strings.Split(rest, ".")
	if len(parts) != 3 {
		return "", "", "", false
	}
	return Untoken(parts[0]), Untoken(parts[1]), parts[2], true
}
