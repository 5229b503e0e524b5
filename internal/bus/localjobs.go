package bus

import (
	"context"
	"sync"
	"time"
)

// localJobs is a Local's work queue. Under a Local no other process can
// reach the embedded server, so every job is enqueued and taken in this
// process, and EnqueueJob hands it to ConsumeJobs in memory: a job then
// costs no JetStream publish and acknowledgement, no delivery to a pull
// consumer, no ack and no write of the consumer's state.
//
// It keeps the promise of the stream's consumer that the worker relies on:
// a job given to a worker that neither acks it nor keeps it in progress
// for AckWait is given out again, marked Redelivered. It does not keep a
// job across a restart, and nothing needs it to: serve, which alone makes
// a Local, ends every turn left queued or streaming by its previous run as
// interrupted when it starts (worker.RecoverAll), before it takes a job.
type localJobs struct {
	mu    sync.Mutex
	queue []queuedJob
	ready chan struct{} // holds a token while the queue may be non-empty
}

type queuedJob struct {
	Job
	redelivered bool
}

func (q *localJobs) push(j Job, redelivered bool) {
	q.mu.Lock()
	q.queue = append(q.queue, queuedJob{Job: j, redelivered: redelivered})
	q.mu.Unlock()
	q.wake()
}

func (q *localJobs) wake() {
	select {
	case q.ready <- struct{}{}:
	default:
	}
}

// pop takes the oldest job, waiting for one until ctx is done (then ok is
// false). The job is redelivered when it is not acked, nor kept in
// progress, for wait.
func (q *localJobs) pop(ctx context.Context, wait time.Duration) (jm *JobMsg, ok bool) {
	for {
		q.mu.Lock()
		if len(q.queue) > 0 {
			next := q.queue[0]
			q.queue[0] = queuedJob{}
			q.queue = q.queue[1:]
			more := len(q.queue) > 0
			q.mu.Unlock()
			if more {
				q.wake() // for another consumer
			}
			lj := &localJob{q: q, job: next.Job, wait: wait}
			lj.mu.Lock()
			lj.timer = time.AfterFunc(wait, lj.expire)
			lj.mu.Unlock()
			return &JobMsg{Job: next.Job, Redelivered: next.redelivered, local: lj}, true
		}
		q.mu.Unlock()
		select {
		case <-q.ready:
		case <-ctx.Done():
			return nil, false
		}
	}
}

// localJob is a job of a localJobs given to a worker: until it is acked,
// its timer puts it back in the queue AckWait after it was given out or
// last kept in progress.
type localJob struct {
	q    *localJobs
	job  Job
	wait time.Duration

	mu      sync.Mutex
	timer   *time.Timer // guarded by mu
	settled bool        // acked or put back; guarded by mu
}

func (lj *localJob) inProgress() {
	lj.mu.Lock()
	defer lj.mu.Unlock()
	if !lj.settled {
		lj.timer.Reset(lj.wait)
	}
}

func (lj *localJob) ack() {
	lj.mu.Lock()
	defer lj.mu.Unlock()
	if !lj.settled {
		lj.settled = true
		lj.timer.Stop()
	}
}

func (lj *localJob) expire() {
	lj.mu.Lock()
	if lj.settled {
		lj.mu.Unlock()
		return
	}
	lj.settled = true
	lj.mu.Unlock()
	lj.q.push(lj.job, true)
}
