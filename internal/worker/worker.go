// Package worker produces turns: it takes jobs from the bus, asks a model
// provider for the reply, publishes numbered deltas and snapshots, saves the
// final message and announces the turn's end.
package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/provider"
	"github.com/tokenrelay/tokenrelay/internal/store"
)

// Config configures a worker. Zero values take the documented defaults.
type Config struct {
	// ID names the worker in logs and readiness answers (default: random).
	ID string
	// Concurrency is the most turns produced at once (default 10000).
	Concurrency int
	// SnapshotInterval is how often a streaming turn's snapshot is written
	// (default 100ms); SnapshotBytes forces one after that much new text
	// (default 4 KiB).
	SnapshotInterval time.Duration
	SnapshotBytes    int
	// JournalSaveInterval applies instead of SnapshotInterval under
	// serve's delta journal (bus.Bus.Journaled): how long a streaming
	// turn's deltas may stay in the journal alone before a snapshot saves
	// them (default 5s; SnapshotBytes still forces one). There a running
	// turn's text is read from its producer (bus.LiveText), not from its
	// snapshot, which only lets the journal drop its deltas and bounds
	// what a restart after a crash replays.
	JournalSaveInterval time.Duration
	// BatchWindow merges tokens that arrive within this window into one
	// delta; 0 publishes every token as its own delta.
	BatchWindow time.Duration
	// DeltaTimestamps stamps each delta with the time it was emitted.
	DeltaTimestamps bool
	// StartGrace holds a fresh turn back this long after the worker takes
	// its job, before the model is called (default 50ms; negative
	// disables), so that a cancel sent right behind the message ("send" and
	// "cancel" written back to back) finds the turn before the model does.
	// It counts from the job, not from the turn's creation: the gateway
	// stores the turn, announces it and queues the job before it reads the
	// sender's next frame, and under load that alone can take longer than
	// the grace. It costs this much time to first token, and nothing for a
	// turn older than freshTurn (a redelivered job).
	StartGrace time.Duration
	// QueuedTimeout is how long a turn may stay queued before a worker
	// enqueues its job again (default 30s; negative disables): a gateway
	// that died between storing a turn and enqueuing its job left it
	// queued with no job, and its conversation refusing every send as
	// turn_active. The jobs stream takes a job once per turn within its
	// duplicate window (2 minutes), and a second job of a turn is acked
	// as soon as a worker finds the turn started. Not under serve's
	// in-process bus, whose restart ends such turns (RecoverAll).
	QueuedTimeout time.Duration
	// Retention is how long the bus keeps a finished turn's events
	// (--retention; 0 keeps them for good). The ids of turns deleted longer
	// ago than it and the bus's two-minute duplicate window are let go,
	// hourly (see forgetDeleted); with 0 they are kept for good too.
	Retention time.Duration
	// StoreTimeout bounds each store call a worker makes (default 10s):
	// reading a turn, starting it, reading its conversation for the model,
	// each try at storing its end, the sweep for queued turns. A store that
	// takes a statement and never answers (a hung server, a lock held, a
	// network that drops packets without a reset, which TCP notices only
	// after many minutes) would otherwise hold the turn, and its job, for
	// as long as that lasts, with nothing logged.
	StoreTimeout time.Duration
	// ContextMessages is how many stored messages are offered to the
	// provider as context (default 100; the provider trims to its budget).
	ContextMessages int
	// TokenBudget, when set, is asked before each turn whether its owner
	// may spend more model tokens; nil means no budget.
	TokenBudget TokenBudget

	Logger   *slog.Logger
	Registry prometheus.Registerer
	Now      func() time.Time
}

// TokenBudget limits the model tokens a user may spend. A turn is charged
// as it streams, a token for each piece of text the model sends (Take), and
// when it ends the provider's own count replaces that estimate (Settle).
type TokenBudget interface {
	// Allow reports whether user may start another turn; a false answer
	// comes with the message shown to the user.
	Allow(user string) (bool, string)
	// Take charges user one token of a reply as it streams, recording it
	// in the turn's charge c, or refuses it, with the message shown to the
	// user, when the budget is used up.
	Take(user string, c *Charge) (bool, string)
	// Settle replaces what the turn's charge c holds with used, the
	// provider's count: tokens past c's are charged, and tokens that Take
	// charged and the provider did not count are given back, to the period
	// they were charged in.
	Settle(user string, c *Charge, used int)
}

// Worker produces turns. Create it with New and run it with Run.
type Worker struct {
	cfg      Config
	bus      *bus.Bus
	store    store.Store
	provider provider.Provider
	log      *slog.Logger
	m        *metrics

	// shutdown is cancelled (with errShutdown) when Run's ctx is done: every
	// running turn's context derives from it.
	shutdownCtx context.Context
	shutdown    context.CancelCauseFunc

	modelDown atomic.Pointer[string] // see health.go
	probed    chan struct{}          // closed once the model server was first probed

	mu      sync.Mutex
	running map[string]*run // turn id → run; guarded by mu
	wg      sync.WaitGroup  // running turns
}

type run struct {
	cancel     context.CancelCauseFunc
	job        *bus.JobMsg // kept in progress by keepJobs
	cancelSeen time.Time   // when the cancel arrived; guarded by Worker.mu
	started    bool        // this worker started the turn; guarded by Worker.mu
}

// producerWait is how long a worker that finds a redelivered job's turn
// streaming waits for its producer to say it still runs (see loadTurn).
const producerWait = 2 * time.Second

// errProducerRuns leaves a redelivered job to the worker that produces its
// turn.
var errProducerRuns = errors.New("the turn's producer still runs")

// freshTurn is how old a turn may be and still be held back by StartGrace.
const freshTurn = time.Second

var (
	errCancelled = errors.New("turn cancelled")
	errShutdown  = errors.New("worker shutting down")
	// errBudgetSpent is emit's answer to a token past the owner's budget:
	// the provider stops, and the turn ends with status error.
	errBudgetSpent = errors.New("token budget used up")
	// errNotStored: the store refused a turn's end for retryFor.
	// Nothing has announced it, so the job is left unacked: the turn goes
	// to recovery once the job comes back, rather than stay streaming.
	errNotStored = errors.New("the turn's end could not be stored")
	// errNotPublished: the turn's end is stored, and the bus refused it
	// for retryFor. The job is left unacked: its next delivery finds the
	// turn ended and publishes the stored end (publishLostEnd), so that
	// the events stream, which resumes and other gateways read, holds it.
	errNotPublished = errors.New("the turn's end could not be published")
)

// ackable reports whether the job of a turn whose work ended with err may
// be acked: not while its end is missing from the store or the stream.
func ackable(err error) bool {
	return !errors.Is(err, errNotStored) && !errors.Is(err, errNotPublished)
}

// retryFor is how long a turn's end is tried again while the store fails
// (a database restarting or failing over), and again while the bus refuses
// it, the job kept meanwhile. A variable for the tests.
var retryFor = 30 * time.Second

// New returns a worker.
func New(cfg Config, b *bus.Bus, s store.Store, p provider.Provider) *Worker {
	if cfg.ID == "" {
		cfg.ID = "worker-" + uuid.NewString()[:8]
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 10000
	}
	if cfg.SnapshotInterval <= 0 {
		cfg.SnapshotInterval = 100 * time.Millisecond
	}
	if cfg.SnapshotBytes <= 0 {
		cfg.SnapshotBytes = 4 << 10
	}
	if cfg.JournalSaveInterval <= 0 {
		cfg.JournalSaveInterval = 5 * time.Second
	}
	if cfg.StartGrace == 0 {
		cfg.StartGrace = 50 * time.Millisecond
	}
	if cfg.QueuedTimeout == 0 {
		cfg.QueuedTimeout = 30 * time.Second
	}
	if cfg.StoreTimeout <= 0 {
		cfg.StoreTimeout = 10 * time.Second
	}
	if cfg.ContextMessages <= 0 {
		cfg.ContextMessages = 100
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	w := &Worker{
		cfg: cfg, bus: b, store: s, provider: p,
		log: cfg.Logger.With("worker_id", cfg.ID), m: newMetrics(cfg.Registry),
		shutdownCtx: ctx, shutdown: cancel,
		running: make(map[string]*run),
		probed:  make(chan struct{}),
	}
	if _, ok := p.(provider.Pinger); !ok {
		close(w.probed) // nothing to probe
	}
	return w
}

// Run takes jobs until ctx is done. Then it ends every turn it is producing
// as interrupted, with its text saved and its end published, and returns
// once they have all ended.
func (w *Worker) Run(ctx context.Context) error {
	defer w.shutdown(errShutdown)
	// Watch cancels before taking any job, so no cancel can slip between a
	// job's tombstone check and its registration.
	watchCtx, stopWatch := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWatch()
	watchEnded, err := w.bus.WatchCancels(watchCtx, w.cancelTurn)
	if err != nil {
		return err
	}
	// A worker whose watch of the cancel bucket ended would miss a cancel
	// whose core signal it did not hear: it stops as on ctx, and says why.
	jobsCtx, stopJobs := context.WithCancelCause(ctx)
	defer stopJobs(nil)
	go func() {
		if err, ok := <-watchEnded; ok {
			w.log.Error("stopping: cannot watch cancels", "err", err)
			stopJobs(err)
		}
	}()
	// Gateways learn from the ping whether the model server can be
	// reached: probe it first.
	probeDone := make(chan struct{})
	go func() {
		defer close(probeDone)
		w.watchProvider(jobsCtx)
	}()
	defer func() {
		stopJobs(nil) // a no-op once Run has stopped its jobs
		<-probeDone
	}()
	select {
	case <-w.probed:
	case <-jobsCtx.Done():
	}
	ping, err := w.bus.ServeWorkerPing(w.cfg.ID, w.modelDownReason)
	if err != nil {
		return err
	}
	defer ping.Unsubscribe()
	producing, err := w.bus.ServeProducing(w.producing)
	if err != nil {
		return err
	}
	defer producing.Unsubscribe()

	keepDone, keepStopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(keepStopped)
		w.keepJobs(keepDone)
	}()
	// After the turns have ended: an interrupted turn keeps its job while
	// it saves.
	defer func() {
		close(keepDone)
		<-keepStopped
	}()

	if w.cfg.QueuedTimeout > 0 && !w.bus.InProcess() {
		requeueDone := make(chan struct{})
		go func() {
			defer close(requeueDone)
			w.requeue(jobsCtx)
		}()
		defer func() { <-requeueDone }()
	}

	if w.cfg.Retention > 0 {
		forgetDone := make(chan struct{})
		go func() {
			defer close(forgetDone)
			w.forgetDeleted(jobsCtx)
		}()
		defer func() { <-forgetDone }()
	}

	sem := make(chan struct{}, w.cfg.Concurrency)
	w.log.Info("worker started", "concurrency", w.cfg.Concurrency)
	err = w.bus.ConsumeJobs(jobsCtx, min(w.cfg.Concurrency, 256), func(jm *bus.JobMsg) {
		// A job waiting here for a free slot is not renewed: past
		// --ack-wait it goes to a worker that has one, and this copy,
		// still a first delivery here, leaves the turn to that worker
		// when it gets to it (see produce).
		if jobsCtx.Err() != nil {
			w.release(jm) // taken as the worker stops: to another worker
			return
		}
		select {
		case sem <- struct{}{}:
		case <-jobsCtx.Done():
			w.release(jm) // not started: to another worker
			return
		}
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			defer func() { <-sem }()
			w.handle(jm)
		}()
	})
	if err == nil && ctx.Err() == nil {
		err = context.Cause(jobsCtx) // the cancel watch's end, or nil
	}
	// ConsumeJobs may also have ended on its own (the consumer deleted):
	// what runs on jobsCtx (requeue, waited for below) ends with it.
	stopJobs(err)
	w.shutdown(errShutdown)
	w.wg.Wait()
	w.log.Info("worker stopped")
	return err
}

// producing reports whether this worker has started turnID and runs it.
func (w *Worker) producing(turnID string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	r := w.running[turnID]
	return r != nil && r.started
}

// cancelTurn stops the turn if this worker is producing it.
func (w *Worker) cancelTurn(turnID string) {
	w.mu.Lock()
	r := w.running[turnID]
	if r != nil && r.cancelSeen.IsZero() {
		r.cancelSeen = w.cfg.Now()
	}
	w.mu.Unlock()
	if r != nil {
		r.cancel(errCancelled)
	}
}

// requeue enqueues again, every QueuedTimeout/2 until ctx is done, the job
// of each turn queued for longer than QueuedTimeout (see Config). The job
// names only the turn, so the worker that takes it reads the turn's state.
func (w *Worker) requeue(ctx context.Context) {
	t := time.NewTicker(max(w.cfg.QueuedTimeout/2, time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		sctx, cancel := w.storeCtx(ctx)
		turns, err := w.store.UnfinishedTurns(sctx)
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				w.log.Warn("look for queued turns", "err", err)
			}
			continue
		}
		cutoff := w.cfg.Now().Add(-w.cfg.QueuedTimeout)
		for _, tn := range turns {
			if tn.Status != chat.StatusQueued || tn.CreatedAt.After(cutoff) {
				continue
			}
			if err := w.bus.EnqueueJob(ctx, bus.Job{TurnID: tn.ID, ConversationID: tn.ConversationID}); err != nil {
				if ctx.Err() == nil {
					w.log.Warn("enqueue the job of a queued turn again", "turn_id", tn.ID, "err", err)
				}
				break
			}
			w.log.Debug("enqueued the job of a queued turn again", "turn_id", tn.ID, "queued_since", tn.CreatedAt)
		}
	}
}

// forgetDeleted lets sends take again the ids of turns deleted longer ago
// than Retention and the duplicate window, at once and then every hour (or
// every Retention, when shorter) until ctx is done. By then the bus holds
// nothing of those turns that a new turn of the same id could be given,
// and the store need not keep their ids for good (one row per deleted
// turn). Several workers doing it at once do it no harm.
func (w *Worker) forgetDeleted(ctx context.Context) {
	keep := w.cfg.Retention + 2*time.Minute // the bus's duplicate window too
	if keep < w.cfg.Retention {
		return // past any date (the sum overflowed): kept for good
	}
	t := time.NewTicker(min(w.cfg.Retention, time.Hour))
	defer t.Stop()
	for {
		before := w.cfg.Now().Add(-keep)
		sctx, cancel := w.storeCtx(ctx)
		n, err := w.store.ForgetDeletedTurns(sctx, before)
		cancel()
		switch {
		case err != nil && ctx.Err() == nil:
			w.log.Warn("forget the ids of deleted turns", "err", err)
		case n > 0:
			w.log.Debug("forgot the ids of deleted turns", "turns", n, "deleted_before", before)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// keepJobs keeps the jobs of the running turns from being redelivered,
// every AckWait/4, until done is closed: one ticker for all of them rather
// than a goroutine and a ticker per turn.
func (w *Worker) keepJobs(done <-chan struct{}) {
	t := time.NewTicker(max(w.bus.AckWait()/4, 50*time.Millisecond))
	defer t.Stop()
	var jobs []*bus.JobMsg
	for {
		select {
		case <-done:
			return
		case <-t.C:
		}
		w.mu.Lock()
		for _, r := range w.running {
			jobs = append(jobs, r.job)
		}
		w.mu.Unlock()
		for _, jm := range jobs {
			_ = jm.InProgress()
		}
		clear(jobs) // hold on to no job past its turn
		jobs = jobs[:0]
	}
}

// handle runs one job to its end. The job is acked once the turn has ended
// (or was found ended); it is left unacked only when the bus failed, so
// that another attempt finds the truth in the stream.
func (w *Worker) handle(jm *bus.JobMsg) {
	log := w.log.With("turn_id", jm.TurnID, "conversation_id", jm.ConversationID)
	tctx, cancel := context.WithCancelCause(w.shutdownCtx)
	defer cancel(nil)
	r := &run{cancel: cancel, job: jm}
	w.mu.Lock()
	if _, dup := w.running[jm.TurnID]; dup {
		w.mu.Unlock()
		return // this worker already produces it; the running copy acks
	}
	w.running[jm.TurnID] = r
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		delete(w.running, jm.TurnID)
		w.mu.Unlock()
	}()

	ctx := context.WithoutCancel(tctx) // store and bus calls finish even when the turn is cancelled
	acked, err := w.produce(ctx, tctx, r, jm, log)
	if err != nil {
		log.Error("turn failed", "err", err)
	}
	if acked {
		if err := jm.Ack(); err != nil {
			log.Warn("ack job", "err", err)
		}
	}
}

// release hands jm, which this worker stops before starting it, back to
// the queue: another worker takes it at once rather than after the ack
// wait, as a rolling restart of the workers stops each of them.
func (w *Worker) release(jm *bus.JobMsg) {
	if err := jm.Release(); err != nil {
		w.log.Warn("hand back a job not started", "turn_id", jm.TurnID, "err", err)
	}
}

// produce does the work of one job and reports whether the job may be acked.
func (w *Worker) produce(ctx, tctx context.Context, r *run, jm *bus.JobMsg, log *slog.Logger) (bool, error) {
	// The job's first delivery carries the turn as the send stored it;
	// anything else reads the turn's state.
	t, fresh := jm.QueuedTurn()
	if !fresh {
		var done bool
		var err error
		if t, done, err = w.loadTurn(ctx, jm.TurnID, log); done || err != nil {
			if errors.Is(err, errProducerRuns) {
				return false, nil // its producer acks it
			}
			if err == nil && t.Status.Terminal() {
				if err := w.publishLostEnd(ctx, t); err != nil {
					return false, err
				}
			}
			return done, err
		}
	}
	if w.cfg.StartGrace > 0 && w.cfg.Now().Sub(t.CreatedAt) < freshTurn {
		timer := time.NewTimer(w.cfg.StartGrace)
		select {
		case <-timer.C:
		case <-tctx.Done():
			timer.Stop()
		}
	}
	if errors.Is(context.Cause(tctx), errShutdown) {
		w.release(jm) // not started: the job goes to another worker or the next run
		return false, nil
	}
	// A fresh job's turn was queued when it was enqueued. In one process
	// (bus.InProcess) every cancel is made here: one that finds the turn
	// queued ends it in the store, and StartTurn below then refuses it
	// (both are conditional on queued); one that finds it started signals
	// this worker, which registered the run before it got here. The
	// tombstone would tell nothing more, and reading it is a JetStream
	// round trip per turn.
	var cancelled bool
	var err error
	if !fresh || !w.bus.InProcess() {
		if cancelled, err = w.bus.IsCancelled(ctx, t.ID); err != nil {
			return false, err
		}
	}
	if fresh && (cancelled || tctx.Err() != nil) {
		// The cancel may have ended the turn while it was queued.
		var done bool
		if t, done, err = w.loadTurn(ctx, jm.TurnID, log); done || err != nil {
			if errors.Is(err, errProducerRuns) {
				return false, nil // its producer acks it
			}
			return done, err
		}
	}
	// Until this worker has started the turn, it ends it only while it is
	// queued: a job's first delivery may reach it late (it waited for a
	// free slot past --ack-wait, and was given to another worker
	// meanwhile), and the turn that other worker started is not this
	// one's to end, nor its job this one's to ack.
	if cancelled || tctx.Err() != nil {
		return w.endQueued(ctx, t, r, chat.StatusCancelled, "")
	}
	if w.cfg.TokenBudget != nil {
		if ok, msg := w.cfg.TokenBudget.Allow(t.Owner); !ok {
			return w.endQueued(ctx, t, r, chat.StatusError, msg)
		}
	}
	// A start the store does not answer in time leaves the job to come
	// back: the turn is then queued, and started anew, or the start was
	// stored after all, and the turn, which nobody produces, is ended
	// interrupted (see loadTurn).
	sctx, cancel := w.storeCtx(ctx)
	started, err := w.store.StartTurn(sctx, t.ID, w.cfg.Now())
	cancel()
	if errors.Is(err, chat.ErrNotFound) {
		return true, nil // the conversation was deleted
	}
	if err != nil {
		return false, fmt.Errorf("start turn: %w", err)
	}
	if !started {
		// A cancel ended it while it was queued, or another worker
		// started it (see above).
		sctx, cancel := w.storeCtx(ctx)
		cur, err := w.store.TurnHead(sctx, t.ID)
		cancel()
		switch {
		case errors.Is(err, chat.ErrNotFound):
			return true, nil
		case err != nil:
			return false, fmt.Errorf("load turn: %w", err)
		}
		return cur.Status.Terminal(), nil
	}
	w.mu.Lock()
	r.started = true
	w.mu.Unlock()
	stopped := func() (bool, error) {
		status := chat.StatusCancelled
		if errors.Is(context.Cause(tctx), errShutdown) {
			status = chat.StatusInterrupted
		}
		_, err := w.finish(ctx, t, r, status, nil, 0, "", nil, nil)
		return ackable(err), err
	}
	if tctx.Err() != nil {
		return stopped()
	}
	// On tctx: a Stop while the store is slow to answer ends the turn at
	// once.
	req, err := w.request(tctx, t)
	if err != nil {
		if tctx.Err() != nil {
			return stopped()
		}
		// Started, so no other worker will produce it: end it now, with
		// the reason, rather than leave it to be found interrupted.
		log.Error("turn failed: the conversation could not be read", "err", err)
		_, err := w.finish(ctx, t, r, chat.StatusError, nil, 0, "the conversation could not be read", nil, nil)
		return ackable(err), err
	}
	return w.stream(ctx, tctx, r, t, req, log)
}

// endQueued ends turn t, which this worker has not started, with status,
// provided it is still queued, and reports whether its job may be acked:
// not when another producer has started the turn.
func (w *Worker) endQueued(ctx context.Context, t chat.Turn, r *run, status chat.TurnStatus, errMsg string) (bool, error) {
	_, err := w.finish(ctx, t, r, status, nil, 0, errMsg, nil, nil, chat.StatusQueued)
	if errors.Is(err, errProducerRuns) {
		return false, nil
	}
	return ackable(err), err
}

// loadTurn reads turn id and reports done when it needs no producing: it
// was deleted or has ended, or another producer started it and died, in
// which case loadTurn ends it as interrupted.
func (w *Worker) loadTurn(ctx context.Context, id string, log *slog.Logger) (t chat.Turn, done bool, err error) {
	// A read the store does not answer in time leaves the job to come
	// back, the turn as it was.
	sctx, cancel := w.storeCtx(ctx)
	t, err = w.store.TurnHead(sctx, id)
	cancel()
	if errors.Is(err, chat.ErrNotFound) {
		return t, true, nil // the conversation was deleted
	}
	if err != nil {
		return t, false, fmt.Errorf("load turn: %w", err)
	}
	if t.Status.Terminal() {
		return t, true, nil
	}
	if t.Status == chat.StatusStreaming {
		// Another producer started this turn and its job came back: it
		// died, or it runs but its renewals of the job were lost (the NATS
		// node leading the job consumer stopped, or the producer was
		// frozen). Ending the turn under a live producer would have it
		// produce on past the end: ask first.
		alive, err := w.bus.ProducerAlive(ctx, t.ID, producerWait)
		if err != nil {
			return t, false, err
		}
		if alive {
			log.Info("job redelivered while its producer runs; leaving it the turn")
			return t, false, errProducerRuns
		}
		status := chat.StatusInterrupted
		if cancelled, err := w.bus.IsCancelled(ctx, t.ID); err == nil && cancelled {
			status = chat.StatusCancelled // its user asked to stop it
		}
		log.Warn("producer lost; ending turn", "status", status)
		if err := w.end(ctx, t, status); err != nil {
			return t, false, err
		}
		// A producer that was only out of reach stops when it hears this
		// (its turn's tombstone), rather than produce past the end.
		if _, err := w.bus.MarkCancelled(ctx, t.ID); err != nil {
			log.Warn("stop the lost producer", "err", err)
		}
		return t, true, nil
	}
	return t, false, nil
}

// publishLostEnd publishes the stored end of turn t when its events lack
// it: the turn's producer stored the end, then died (or could not publish
// it) before the end reached the bus, and the job came back. A join reads
// an ended turn from the store, but a connection already following the
// turn hears its end only from the bus, and would wait for it for good.
func (w *Worker) publishLostEnd(ctx context.Context, t chat.Turn) error {
	head, err := w.bus.ReadHead(ctx, t.ConversationID, t.ID)
	if err != nil && !errors.Is(err, bus.ErrNoSnapshot) {
		return err
	}
	found := false
	err = w.bus.ReadTurn(ctx, t.ConversationID, t.ID, head.StreamSeq+1, func(e bus.Event) bool {
		found = e.Kind == bus.KindEnd
		return !found
	})
	if err != nil || found {
		return err
	}
	w.log.Warn("publishing the stored end of a turn whose producer did not", "turn_id", t.ID, "status", t.Status)
	_, err = w.bus.PublishEnd(ctx, &bus.Event{Kind: bus.KindEnd, ConversationID: t.ConversationID, TurnID: t.ID, Seq: t.Seq, Status: t.Status, Error: t.Error, Usage: t.Usage}, nil)
	return err
}

// request builds the provider request: the conversation up to the message
// being answered.
func (w *Worker) request(ctx context.Context, t chat.Turn) (provider.Request, error) {
	sctx, cancel := w.storeCtx(ctx)
	defer cancel()
	msgs, err := w.store.Messages(sctx, t.ConversationID, w.cfg.ContextMessages, t.ID)
	if err != nil {
		return provider.Request{}, fmt.Errorf("load context: %w", err)
	}
	req := provider.Request{TurnID: t.ID, Model: t.Model}
	for _, m := range msgs {
		if m.Content == "" {
			continue
		}
		req.Messages = append(req.Messages, provider.Message{Role: string(m.Role), Content: m.Content})
	}
	return req, nil
}

// stream asks the provider for the reply and publishes it.
func (w *Worker) stream(ctx, tctx context.Context, r *run, t chat.Turn, req provider.Request, log *slog.Logger) (bool, error) {
	w.m.running.Inc()
	defer w.m.running.Dec()
	startedAt := w.cfg.Now()
	pub := newPublisher(ctx, w, t)
	defer pub.stop()
	// Joins and repairs read the turn's text from here while it runs
	// (see bus.LiveTurn), until the end is stored: the snapshot and the
	// stream then hold it all when they read it there instead.
	defer w.bus.AddLiveTurn(t.ConversationID, t.ID, pub)()

	w.m.providerReqs.Inc()
	res, perr := w.provider.Stream(tctx, req, pub.emit)
	// The end may go live once every delta is: under a journal that is as
	// soon as the pending text is published, and only the end's storing
	// waits, for the turn's snapshot to save the deltas (settle);
	// otherwise deltas are live once stored, so the end waits for that.
	journaled := w.bus.Journaled()
	if journaled {
		if err := pub.flushPending(); err != nil && perr == nil {
			perr = err
		}
	} else if err := pub.flush(); err != nil && perr == nil {
		perr = err
	}
	if pub.failed() {
		// The bus refused a delta: what reached the stream is unknown here,
		// so leave the job to be redelivered; the next attempt ends the turn
		// from the stream's truth (under a journal, saved first).
		log.Error("publish failed; leaving the turn to recovery", "err", pub.err)
		if journaled {
			if err := pub.save(chat.StatusStreaming); err != nil {
				log.Error("save the journaled deltas", "err", err)
			}
		}
		return false, nil
	}
	status, errMsg := chat.StatusComplete, ""
	switch cause := context.Cause(tctx); {
	case perr == nil:
	case errors.Is(cause, errCancelled):
		status = chat.StatusCancelled
	case errors.Is(cause, errShutdown):
		status = chat.StatusInterrupted
	case errors.Is(perr, errBudgetSpent):
		status, errMsg = chat.StatusError, pub.budgetRefusal()
	default:
		status = chat.StatusError
		var pe *provider.Error
		if errors.As(perr, &pe) {
			errMsg = pe.Message
			// What the user sees is in the turn's end; the cause (the
			// model server's answer, redacted) only here.
			log.Warn("turn failed at the model provider", "err", perr, "seq", pub.seq)
		} else {
			errMsg = "the model provider failed"
			log.Error("provider failed", "err", perr)
		}
	}
	if b := w.cfg.TokenBudget; b != nil && res.Usage != nil {
		// Take charged the reply's pieces as they came: the provider's own
		// count, prompt included, replaces that estimate.
		pub.settle(b, res.Usage.PromptTokens+res.Usage.CompletionTokens)
	}
	w.m.duration.Observe(w.cfg.Now().Sub(startedAt).Seconds())
	if !pub.firstAt.IsZero() {
		w.m.firstDelta.Observe(pub.firstAt.Sub(t.CreatedAt).Seconds())
	}
	var settle func() error
	if journaled {
		settle = func() error { return pub.save(status) }
	}
	won, err := w.finish(ctx, t, r, status, pub.text, pub.seq, errMsg, res.Usage, settle)
	if errors.Is(err, errNotStored) {
		// Left to recovery, which ends the turn from the snapshot and the
		// stream: under a journal, save what only the journal holds.
		if journaled {
			if err := pub.save(chat.StatusStreaming); err != nil {
				log.Error("save the journaled deltas", "err", err)
			}
		}
		return false, err
	}
	if won && errors.Is(err, errNotPublished) {
		// Stored, and left to the job's next delivery to publish: the
		// snapshot is this producer's to save all the same.
		pub.finalSnapshot(status)
		return false, err
	}
	if err != nil || !won {
		// Ended by another (a worker that took this one for lost), or
		// deleted: the stored text is the winner's, and so must the
		// snapshot be; nothing will read what the journal holds of this
		// producer's deltas, which must not keep its segments. The
		// winner's end, which this one published, may be in the stream
		// only thanks to it (the winner may have died before publishing):
		// when the bus refused it, the job's next delivery publishes it.
		pub.drop()
		return ackable(err), err
	}
	// After the end: a resume of the finished turn then reads no stream
	// tail, and the end did not wait for this write (under a journal it
	// was settle's).
	pub.finalSnapshot(status)
	return true, nil
}

// finish stores the turn's end (exactly once, whoever else tries) and then
// publishes it with the status that won; settle, when not nil, is called
// before the end is stored in the stream (see bus.PublishEnd), if this
// call's end won. It reports whether it did.
func (w *Worker) finish(ctx context.Context, t chat.Turn, r *run, status chat.TurnStatus, text []byte, seq int64, errMsg string, usage *chat.Usage, settle func() error, from ...chat.TurnStatus) (bool, error) {
	final, won, err := w.finishTurn(ctx, store.TurnResult{
		TurnID: t.ID, Status: status, Content: string(text), Seq: seq,
		Error: errMsg, Usage: usage, Now: w.cfg.Now(),
	}, from)
	if errors.Is(err, chat.ErrNotFound) {
		return false, nil // deleted meanwhile
	}
	if err != nil {
		return false, fmt.Errorf("%w: %w", errNotStored, err)
	}
	if !won && !final.Terminal() {
		// Only from the statuses from allows, and another producer has
		// started the turn: its end is that producer's.
		return false, errProducerRuns
	}
	end := &bus.Event{Kind: bus.KindEnd, ConversationID: t.ConversationID, TurnID: t.ID, Seq: seq, Status: final}
	if won {
		end.Error, end.Usage = errMsg, usage
	} else {
		settle = nil // the snapshot is the winner's to save
		sctx, cancel := w.storeCtx(ctx)
		if stored, err := w.store.TurnHead(sctx, t.ID); err == nil {
			end.Seq, end.Error, end.Usage = stored.Seq, stored.Error, stored.Usage
		}
		cancel()
	}
	if r != nil {
		// The end goes live first thing in PublishEnd, and a cancel's user
		// waits for nothing after that (the snapshot's save, the end's
		// store in the stream).
		w.mu.Lock()
		seen := r.cancelSeen
		w.mu.Unlock()
		if !seen.IsZero() {
			w.m.cancelToEnd.Observe(w.cfg.Now().Sub(seen).Seconds())
		}
	}
	if won {
		w.m.turns.WithLabelValues(string(final)).Inc()
	}
	// The end is stored: the stream must hold it too, or a reader of the
	// stream (a resume, a gateway repairing a view) finds none. A publish
	// that failed is repeated (settle again too: it does nothing once it
	// has saved, and the stream stores an end once within two minutes),
	// and one that still fails leaves the job unacked (errNotPublished).
	err = w.retry(ctx, "publish the end of a turn", func() (bool, error) {
		_, err := w.bus.PublishEnd(ctx, end, settle)
		return false, err
	}, func() []any { return []any{"turn_id", t.ID, "status", final} })
	if err != nil {
		return won, fmt.Errorf("%w: %w", errNotPublished, err)
	}
	return won, nil
}

// finishTurn stores a turn's end, trying again while the store fails (see
// retry); a try the store does not answer within StoreTimeout counts as
// failed.
func (w *Worker) finishTurn(ctx context.Context, r store.TurnResult, from []chat.TurnStatus) (final chat.TurnStatus, won bool, err error) {
	err = w.retry(ctx, "store the end of a turn", func() (bool, error) {
		sctx, cancel := w.storeCtx(ctx)
		defer cancel()
		var err error
		final, won, err = w.store.FinishTurn(sctx, r, from...)
		return errors.Is(err, chat.ErrNotFound), err
	}, func() []any { return []any{"turn_id", r.TurnID, "status", r.Status} })
	return final, won, err
}

// storeCtx bounds one store call by StoreTimeout (see Config). A call
// that runs out of it fails with context.DeadlineExceeded, as when the
// store refuses it.
func (w *Worker) storeCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, w.cfg.StoreTimeout)
}

// retry calls try until it succeeds or its error is final, trying again
// with a growing pause for up to retryFor, or until the worker is shutting
// down or ctx, on which try calls the store or bus, is done (every try
// would then fail at once: RecoverAll's ctx ends as serve is stopped while
// it starts). While it tries, the turn's run stays registered, so its job is
// renewed and a worker asking whether it is produced hears that it is. It
// logs the first failure and, after one, the outcome: a store or bus that
// flaps would otherwise make a line of every try. An error given up on
// says how often it was tried. attrs gives the log lines' attributes; it
// is called only for a line, so that a first try that succeeds, as nearly
// every one does, costs no allocation for them.
func (w *Worker) retry(ctx context.Context, what string, try func() (final bool, err error), attrs func() []any) error {
	started := time.Now()
	pause := 100 * time.Millisecond
	for tries := 1; ; tries++ {
		final, err := try()
		if err == nil || final {
			if tries > 1 {
				a := append(attrs(), "tries", tries, "took", time.Since(started).Round(time.Millisecond))
				if err != nil {
					a = append(a, "err", err)
				}
				w.log.Info(what+": done after retrying", a...)
			}
			return err
		}
		if time.Since(started)+pause > retryFor || w.shutdownCtx.Err() != nil || ctx.Err() != nil {
			return fmt.Errorf("%w (tried %d times in %s)", err, tries, time.Since(started).Round(time.Millisecond))
		}
		if tries == 1 {
			w.log.Warn(what+"; trying again", append(attrs(), "err", err, "for", retryFor)...)
		}
		timer := time.NewTimer(pause)
		select {
		case <-timer.C:
		case <-w.shutdownCtx.Done():
			timer.Stop()
		case <-ctx.Done():
			timer.Stop()
		}
		pause = min(2*pause, 2*time.Second)
	}
}

// Interrupt ends a turn whose producer is gone: its text so far (snapshot
// plus the deltas after it in the stream) is saved with status interrupted
// and the end is published. A turn that has ended meanwhile is left alone.
func (w *Worker) Interrupt(ctx context.Context, t chat.Turn) error {
	return w.end(ctx, t, chat.StatusInterrupted)
}

// end is Interrupt with the status to end the turn with.
func (w *Worker) end(ctx context.Context, t chat.Turn, status chat.TurnStatus) error {
	snap, err := w.bus.ReadSnapshot(ctx, t.ConversationID, t.ID)
	if err != nil && !errors.Is(err, bus.ErrNoSnapshot) {
		return err
	}
	text := []byte(snap.Text)
	seq := snap.Seq
	var ended *bus.Event
	err = w.bus.ReadTurn(ctx, t.ConversationID, t.ID, snap.StreamSeq+1, func(e bus.Event) bool {
		switch e.Kind {
		case bus.KindDelta:
			if e.Seq == seq+1 {
				text = append(text, e.Text...)
				seq = e.Seq
			}
		case bus.KindEnd:
			ended = &e
			return false
		}
		return true
	})
	if err != nil {
		return err
	}
	if ended != nil {
		// Its producer published the end but did not store it: store what
		// the stream says. The turn ends here, so it counts here.
		final, won, err := w.finishTurn(ctx, store.TurnResult{
			TurnID: t.ID, Status: ended.Status, Content: string(text), Seq: seq,
			Error: ended.Error, Usage: ended.Usage, Now: w.cfg.Now(),
		}, nil)
		if err == nil && won {
			w.m.turns.WithLabelValues(string(final)).Inc()
		}
		return err
	}
	_, err = w.finish(ctx, t, nil, status, text, seq, "", nil, nil)
	return err
}

// RecoverAll ends as interrupted every turn still queued or streaming. Only
// a process that is the sole producer (serve, at start) may call it: with
// several workers it would end their live turns.
func (w *Worker) RecoverAll(ctx context.Context) (int, error) {
	sctx, cancel := w.storeCtx(ctx)
	turns, err := w.store.UnfinishedTurns(sctx)
	cancel()
	if err != nil {
		return 0, err
	}
	for _, t := range turns {
		if err := w.Interrupt(ctx, t); err != nil {
			return 0, fmt.Errorf("recover turn %s: %w", t.ID, err)
		}
	}
	return len(turns), nil
}
