package bus

// SetSegmentBytes makes the journal start a new segment once one holds n
// bytes, so that tests see segments come and go.
func (j *Journal) SetSegmentBytes(n int64) { j.segmentBytes = n }
