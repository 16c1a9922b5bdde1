//! A whole batch: typed, strided input views, padded or packed rows, rayon over rows.
//!
//! Each row is widened into per-thread float64 buffers (row-sized, reused across rows
//! and calls, freed after a call with a row above `KEEP_ROW_BUFFERS_UP_TO`) and handed to `row::compute_row`; outputs are written in place into
//! caller-provided contiguous buffers, so a call allocates nothing of batch size.

use std::cell::RefCell;

use half::bf16;
use std::ops::Range;

use ndarray::{s, ArrayView1, ArrayViewD, Axis, Ix1, Slice};

use crate::params::Params;
use crate::row::{
    compute_row, compute_row_deferred, sized, valid_window, Advantage, BadValue, RowInput,
    RowOutput, RowSummary, Scratch, SPLIT_CHUNK,
};
pub use crate::views::{FloatView, MaskView};
use flags::{bool_row, cost_of, row_window};
#[cfg(test)]
use flags::{row_cost, window_range};

/// Row structure: `[rows, cols]` padded, or 1-D packed with `offsets` (cu_seqlens,
/// `offsets[0] == 0`, non-decreasing, last == total length; checked in Python).
#[derive(Clone, Copy)]
pub enum Layout<'a> {
    Padded { rows: usize, cols: usize },
    Packed { offsets: &'a [i64] },
}

impl Layout<'_> {
    pub fn num_rows(&self) -> usize {
        match self {
            Layout::Padded { rows, .. } => *rows,
            Layout::Packed { offsets } => offsets.len().saturating_sub(1),
        }
    }
    fn bounds(&self, r: usize) -> (usize, usize) {
        match self {
            Layout::Padded { cols, .. } => (r * cols, (r + 1) * cols),
            Layout::Packed { offsets } => (offsets[r] as usize, offsets[r + 1] as usize),
        }
    }
}

/// One row of a (padded 2-D or packed 1-D) view as a 1-D view.
fn row_of<'v, T>(view: &'v ArrayViewD<'_, T>, layout: &Layout, r: usize) -> ArrayView1<'v, T> {
    match layout {
        Layout::Padded { .. } => view
            .index_axis(Axis(0), r)
            .into_dimensionality::<Ix1>()
            .expect("2-D input"),
        Layout::Packed { offsets } => view
            .slice_axis(
                Axis(0),
                Slice::from(offsets[r] as usize..offsets[r + 1] as usize),
            )
            .into_dimensionality::<Ix1>()
            .expect("1-D input"),
    }
}

fn widen_into<T: Copy>(row: ArrayView1<T>, out: &mut Vec<f64>, f: impl Fn(T) -> f64) {
    let out = sized(out, row.len());
    match row.as_slice() {
        Some(s) => out.iter_mut().zip(s).for_each(|(o, &x)| *o = f(x)),
        None => out.iter_mut().zip(row.iter()).for_each(|(o, &x)| *o = f(x)),
    }
}

impl FloatView<'_> {
    /// Columns `cols` of row `r`, widened to float64.
    fn row_into(&self, layout: &Layout, r: usize, cols: Range<usize>, out: &mut Vec<f64>) {
        macro_rules! part {
            ($v:expr) => {
                row_of($v, layout, r).slice_move(s![cols.clone()])
            };
        }
        match self {
            FloatView::F64(v) => widen_into(part!(v), out, |x| x),
            FloatView::F32(v) => widen_into(part!(v), out, |x| x as f64),
            FloatView::F16(v) => widen_into(part!(v), out, |x| x.to_f64()),
            FloatView::Bf16(v) => widen_into(part!(v), out, |x| bf16::from_bits(x as u16).to_f64()),
        }
    }
    /// Element `i` of a 1-D view (per-row advantages).
    fn scalar(&self, i: usize) -> f64 {
        match self {
            FloatView::F64(v) => v[[i]],
            FloatView::F32(v) => v[[i]] as f64,
            FloatView::F16(v) => v[[i]].to_f64(),
            FloatView::Bf16(v) => bf16::from_bits(v[[i]] as u16).to_f64(),
        }
    }
}

pub struct BatchInput<'a> {
    pub layout: Layout<'a>,
    pub log_probs: FloatView<'a>,
    pub old_log_probs: FloatView<'a>,
    pub advantages: FloatView<'a>,
    /// Advantages are `[B]` (one per row) rather than token-shaped.
    pub advantage_per_row: bool,
    /// `None`: every position is valid.
    pub valid: Option<MaskView<'a>>,
    pub divergence: Option<FloatView<'a>>,
}

/// Contiguous output buffers, in the input's (flattened) shape; `row_budget` has one
/// entry per row.
pub struct BatchOutput<'a> {
    pub mask: &'a mut [bool],
    pub reason: Option<&'a mut [i8]>,
    pub threshold: Option<&'a mut [f64]>,
    pub gate: Option<&'a mut [f64]>,
    pub row_budget: Option<&'a mut [f64]>,
}

#[derive(Default)]
struct RowBuffers {
    log_probs: Vec<f64>,
    old_log_probs: Vec<f64>,
    advantages: Vec<f64>,
    divergence: Vec<f64>,
    valid: Vec<u8>,
    scratch: Scratch,
}

thread_local! {
    static BUFFERS: RefCell<RowBuffers> = RefCell::new(RowBuffers::default());
    /// The other rows of a group (`run_group`).
    static GROUP_BUFFERS: RefCell<[RowBuffers; GROUP - 1]> = RefCell::new(Default::default());
}

/// Rows up to this many tokens keep their per-thread buffers between calls (at most
/// ~12 MB a thread); after a call with a longer row, every thread of the pool frees its
/// buffers, so one huge row does not keep its memory for the life of the process.
pub const KEEP_ROW_BUFFERS_UP_TO: usize = 1 << 18;

fn longest_row(layout: &Layout) -> usize {
    match layout {
        Layout::Padded { rows, cols } => (*rows > 0) as usize * cols,
        Layout::Packed { offsets } => offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0),
    }
}

/// Frees this thread's row buffers.
fn free_buffers() {
    BUFFERS.with(|cell| *cell.borrow_mut() = RowBuffers::default());
    GROUP_BUFFERS.with(|cell| *cell.borrow_mut() = Default::default());
}

/// Frees the row buffers of every thread of the current rayon pool.
fn release_row_buffers() {
    rayon::broadcast(|_| free_buffers());
}

struct RowJob<'a> {
    row: usize,
    /// Split the row's Binary TV pass over the pool (few rows).
    split: bool,
    /// The row's valid window when already found (`row_window`): then only its flags
    /// are converted from a non-bool mask.
    window: Option<Range<usize>>,
    out: RowOutput<'a>,
    budget: Option<&'a mut f64>,
}

/// Splits `buf` into consecutive row slices.
fn split_rows<'a, T>(mut buf: &'a mut [T], layout: &Layout) -> Vec<&'a mut [T]> {
    let n = layout.num_rows();
    let mut rows = Vec::with_capacity(n);
    let mut at = 0;
    for r in 0..n {
        let (start, end) = layout.bounds(r);
        let (_, rest) = std::mem::take(&mut buf).split_at_mut(start - at);
        let (row, rest) = rest.split_at_mut(end - start);
        rows.push(row);
        buf = rest;
        at = end;
    }
    rows
}

fn split_optional<'a, T>(buf: Option<&'a mut [T]>, layout: &Layout) -> Vec<Option<&'a mut [T]>> {
    match buf {
        Some(b) => split_rows(b, layout).into_iter().map(Some).collect(),
        None => (0..layout.num_rows()).map(|_| None).collect(),
    }
}

/// The window of row `r` of two same-typed views as contiguous slices, when both are.
fn contiguous_pair<'v, T>(
    a: &'v ArrayViewD<'_, T>,
    b: &'v ArrayViewD<'_, T>,
    layout: &Layout,
    r: usize,
    cols: Range<usize>,
) -> Option<(&'v [T], &'v [T])> {
    let a = row_of(a, layout, r)
        .slice_move(s![cols.clone()])
        .to_slice()?;
    let b = row_of(b, layout, r).slice_move(s![cols]).to_slice()?;
    Some((a, b))
}

fn run_row(params: &Params, input: &BatchInput, job: RowJob) -> Result<RowSummary, BadValue> {
    // The buffers are taken out of the thread-local for the row and put back after it:
    // a split row's Binary TV pass waits in rayon's `join`, where this thread may run
    // another row's job (work stealing); that nested row then starts from empty buffers
    // instead of finding them borrowed.
    let mut job = job;
    let mut b = BUFFERS.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    let result = run_row_with(params, input, &mut job, &mut b, false).map(|(s, _)| s);
    BUFFERS.with(|cell| *cell.borrow_mut() = b);
    result
}

/// Rows a thread prepares before finishing their mask-only scans together (`run_group`).
pub(crate) const GROUP: usize = 4;

/// Up to `GROUP` rows on this thread, taken one at a time from `next` as the last one's
/// Binary TV pass ends (another thread may take the rest meanwhile: see
/// `run_here_and_on`). Mask-only rows leave their scans pending and finish them
/// together (`row::scan_mask_group`: the rows' prefix-sum chains overlap); the bits are
/// those of `run_row`.
fn run_group<'a>(
    params: &Params,
    input: &BatchInput,
    mut next: impl FnMut() -> Option<RowJob<'a>>,
) -> Acc {
    let mut first = BUFFERS.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    let mut rest = GROUP_BUFFERS.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    let mut bufs: Vec<&mut RowBuffers> =
        std::iter::once(&mut first).chain(rest.iter_mut()).collect();
    let mut jobs = Vec::with_capacity(GROUP);
    let mut results = Vec::with_capacity(GROUP);
    for b in bufs.iter_mut() {
        let Some(mut job) = next() else { break };
        results.push(run_row_with(params, input, &mut job, b, true));
        jobs.push(job);
    }
    bufs.truncate(jobs.len());
    {
        let pending: Vec<_> = jobs
            .iter_mut()
            .zip(bufs.iter_mut())
            .zip(&results)
            .filter_map(|((job, b), r)| match r {
                Ok((s, Some(w))) => {
                    let row = job.row;
                    pending_scan(input, Some((s.budget, w.clone(), row)), job, b)
                }
                _ => None,
            })
            .collect();
        crate::row::scan_mask_group(params, pending);
    }
    drop(bufs);
    BUFFERS.with(|cell| *cell.borrow_mut() = first);
    GROUP_BUFFERS.with(|cell| *cell.borrow_mut() = rest);
    results
        .into_iter()
        .map(|r| match r {
            Ok((s, _)) => (None, s.counts),
            Err(e) => (Some(e), [0; 5]),
        })
        .fold((None, [0; 5]), merge)
}

/// The pending scan of a row left by `run_row_with(.., defer = true)`: its valid flags
/// are where `run_row_with` read them (in place, or in `buf`).
fn pending_scan<'v>(
    input: &'v BatchInput,
    pending: Option<(f64, Range<usize>, usize)>,
    job: &'v mut RowJob,
    buf: &'v mut RowBuffers,
) -> Option<crate::row::PendingScan<'v>> {
    let (budget, w, r) = pending?;
    let len = job.out.mask.len();
    let RowBuffers { valid, scratch, .. } = buf;
    let valid: &[u8] = match input
        .valid
        .as_ref()
        .and_then(|m| bool_row(m, &input.layout, r))
    {
        Some(s) => s,
        None => &valid[..len],
    };
    Some(crate::row::PendingScan {
        valid: &valid[w.clone()],
        scratch,
        budget,
        mask: &mut job.out.mask[w],
    })
}

/// One row into `b`; with `defer`, a mask-only row's scan is left pending and its
/// window returned (`row::compute_row_deferred`).
fn run_row_with(
    params: &Params,
    input: &BatchInput,
    job: &mut RowJob,
    b: &mut RowBuffers,
    defer: bool,
) -> Result<(RowSummary, Option<Range<usize>>), BadValue> {
    {
        let RowBuffers {
            log_probs,
            old_log_probs,
            advantages,
            divergence,
            valid,
            scratch,
        } = b;
        let layout = &input.layout;
        let r = job.row;
        let len = job.out.mask.len();
        let (valid, window) = match (&input.valid, job.window.clone()) {
            (Some(v), Some(w)) => (v.row_flags_in(layout, r, valid, w.clone()), w),
            (Some(v), None) => {
                let flags = v.row_flags(layout, r, valid);
                (flags, valid_window(flags))
            }
            (None, _) => {
                sized(valid, len).fill(1);
                (&valid[..len], 0..len)
            }
        };
        // Only the span between the first and last valid position needs the floats.
        let n = window.len();
        let advantages = if input.advantage_per_row {
            Advantage::Row(input.advantages.scalar(r))
        } else {
            input
                .advantages
                .row_into(layout, r, window.clone(), advantages);
            Advantage::Token(&advantages[..n])
        };
        let divergence = match &input.divergence {
            Some(d) => {
                d.row_into(layout, r, window.clone(), divergence);
                Some(&divergence[..n])
            }
            None => None,
        };
        let out = RowOutput {
            mask: &mut *job.out.mask,
            reason: job.out.reason.as_deref_mut(),
            threshold: job.out.threshold.as_deref_mut(),
            gate: job.out.gate.as_deref_mut(),
        };
        let split = job.split;
        macro_rules! run {
            ($lp:expr, $lq:expr) => {{
                let input = RowInput {
                    valid,
                    window: window.clone(),
                    log_probs: $lp,
                    old_log_probs: $lq,
                    advantages,
                    divergence,
                    split,
                };
                if defer {
                    compute_row_deferred(params, r, &input, scratch, out)
                        .map(|(s, p)| (s, p.then(|| window.clone())))
                } else {
                    compute_row(params, r, &input, scratch, out).map(|s| (s, None))
                }
            }};
        }
        // Contiguous log-probs of one dtype are read in place; others are widened into
        // float64 row buffers first.
        let cols = window.clone();
        let summary = match (&input.log_probs, &input.old_log_probs) {
            (FloatView::F64(p), FloatView::F64(q))
                if contiguous_pair(p, q, layout, r, cols.clone()).is_some() =>
            {
                let (p, q) = contiguous_pair(p, q, layout, r, cols).unwrap();
                run!(p, q)
            }
            (FloatView::F32(p), FloatView::F32(q))
                if contiguous_pair(p, q, layout, r, cols.clone()).is_some() =>
            {
                let (p, q) = contiguous_pair(p, q, layout, r, cols).unwrap();
                run!(p, q)
            }
            (FloatView::F16(p), FloatView::F16(q))
                if contiguous_pair(p, q, layout, r, cols.clone()).is_some() =>
            {
                let (p, q) = contiguous_pair(p, q, layout, r, cols).unwrap();
                run!(p, q)
            }
            (FloatView::Bf16(p), FloatView::Bf16(q))
                if contiguous_pair(p, q, layout, r, cols.clone()).is_some() =>
            {
                let (p, q) = contiguous_pair(p, q, layout, r, cols).unwrap();
                run!(as_bf16(p), as_bf16(q))
            }
            _ => {
                input
                    .log_probs
                    .row_into(layout, r, window.clone(), log_probs);
                input
                    .old_log_probs
                    .row_into(layout, r, window.clone(), old_log_probs);
                run!(&log_probs[..n], &old_log_probs[..n])
            }
        }?;
        if let Some(slot) = job.budget.as_deref_mut() {
            *slot = summary.0.budget;
        }
        Ok(summary)
    }
}

/// bfloat16 bit patterns (stored as int16) viewed as `half::bf16`.
fn as_bf16(bits: &[i16]) -> &[bf16] {
    // SAFETY: bf16 is a #[repr(transparent)] u16: same size and alignment as i16, and
    // every bit pattern is a valid bf16.
    unsafe { std::slice::from_raw_parts(bits.as_ptr().cast::<bf16>(), bits.len()) }
}

/// How `compute_batch_with` runs a batch's rows. Row results do not depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parallelism {
    /// On the calling thread, one row after the other: no rayon at all (a parallel
    /// iterator outside a pool would run on rayon's global pool).
    Serial,
    /// On the current rayon pool (call it inside `ThreadPool::install`).
    Pool,
}

/// Batches of at most this many (padded or packed) tokens run on the calling thread
/// whatever the thread count: below it, handing the work to a pool and waiting for it
/// costs more than the rows (~2.5 ns a token on one core against tens of microseconds
/// for a pool's wake-up).
pub const INLINE_TOKENS: usize = 1 << 15;

fn total_tokens(layout: &Layout) -> usize {
    match layout {
        Layout::Padded { rows, cols } => rows * cols,
        Layout::Packed { offsets } => match (offsets.first(), offsets.last()) {
            (Some(&a), Some(&b)) => (b - a) as usize,
            _ => 0,
        },
    }
}

/// Computes the mask for every row with `threads` threads (0: the default pool, one
/// per core; see `pool`). One thread or a small batch (`INLINE_TOKENS`) runs on the
/// calling thread (the pool is still started, so that a count whose threads cannot
/// start fails whatever the batch). Otherwise the calling thread works as one of the
/// `threads` workers (`run_here_and_on`). The results are the same either way.
pub fn compute_batch_threads(
    threads: usize,
    params: &Params,
    input: &BatchInput,
    output: BatchOutput,
) -> Result<Result<[u64; 5], BadValue>, crate::pool::PoolError> {
    if threads == 1 {
        return Ok(compute_batch_with(
            Parallelism::Serial,
            params,
            input,
            output,
        ));
    }
    let here = total_tokens(&input.layout) <= INLINE_TOKENS;
    crate::pool::with_pool(threads, |pool| {
        let threads = pool.current_num_threads();
        if here || threads == 1 {
            return Ok(compute_batch_with(
                Parallelism::Serial,
                params,
                input,
                output,
            ));
        }
        // A row above 5/4 of a thread's share (few long rows) needs its Binary TV pass
        // split over the pool: then the pool runs the call (`compute_batch_with`
        // splits long rows when rows are few; the split never changes a result).
        let windows: Vec<Option<Range<usize>>> = (0..input.layout.num_rows())
            .map(|r| row_window(input, r))
            .collect();
        let costs: Vec<usize> = windows
            .iter()
            .enumerate()
            .map(|(r, w)| cost_of(input, r, w))
            .collect();
        let total: usize = costs.iter().sum();
        let needs_split = costs
            .iter()
            .any(|&c| c >= 2 * SPLIT_CHUNK && 4 * threads * c > 5 * total);
        if needs_split {
            Ok(pool.install(|| compute_batch_with(Parallelism::Pool, params, input, output)))
        } else {
            // The caller is one of the `threads` workers: the helpers come from a pool
            // of `threads - 1`, so that no idle pool thread spins for work beside them
            // (rayon's idle threads yield in a loop before they sleep: on a 2-core
            // machine a third runnable thread preempted the two workers ~20 times in a
            // 2.3 ms call).
            crate::pool::with_pool(threads - 1, |helpers| {
                run_here_and_on(helpers, params, input, output, &costs, windows)
            })
        }
    })?
}

/// The rows of a batch on the calling thread and every thread of `pool` (the
/// helpers), each working through its own list of rows and then taking the last rows
/// of the others' (below). Handing a call to a pool and sleeping until it is done costs
/// two thread wake-ups (tens of microseconds each in a VM) in series with the work;
/// here the caller starts at once, the pool threads join as they wake, and the caller
/// waits for the last of them spinning (bounded) rather than asleep.
///
/// No row is split here (the caller's thread is not in the pool).
fn run_here_and_on(
    pool: &rayon::ThreadPool,
    params: &Params,
    input: &BatchInput,
    output: BatchOutput,
    costs: &[usize],
    windows: Vec<Option<Range<usize>>>,
) -> Result<[u64; 5], BadValue> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let threads = pool.current_num_threads() + 1;
    let layout = input.layout;
    let mut jobs: Vec<(usize, RowJob)> = make_jobs(output, &layout)
        .into_iter()
        .zip(windows)
        .map(|(mut j, w)| {
            j.window = w;
            (costs[j.row], j)
        })
        .collect();
    // Longest first (stable: ties keep the row order).
    jobs.sort_by_key(|(cost, _)| std::cmp::Reverse(*cost));
    // Each worker (0: the caller, 1..: the helpers) gets its own list: the rows in
    // groups of `GROUP` neighbours (similar lengths, as the serial path groups them),
    // each group dealt, longest first, to the worker with the least work so far.
    let helpers = (threads - 1).min(jobs.len().saturating_sub(1));
    let workers = helpers + 1;
    let mut lists: Vec<Vec<usize>> = vec![Vec::new(); workers];
    let mut load = vec![0usize; workers];
    for (g, group) in jobs.chunks(GROUP).enumerate() {
        let w = (0..workers).min_by_key(|&w| load[w]).unwrap_or(0);
        lists[w].extend(g * GROUP..g * GROUP + group.len());
        load[w] += group.iter().map(|(cost, _)| (*cost).max(1)).sum::<usize>();
    }
    let slots: Vec<Mutex<Option<RowJob>>> =
        jobs.into_iter().map(|(_, j)| Mutex::new(Some(j))).collect();
    // A list's (head, tail): its owner takes rows from the head, others from the tail.
    let ends: Vec<Mutex<(usize, usize)>> = lists.iter().map(|l| Mutex::new((0, l.len()))).collect();
    let running = AtomicUsize::new(0);
    let sum = Mutex::new((None, [0u64; 5]));
    let take = |i: usize| {
        slots[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .expect("each job is taken once")
    };
    let add = |acc: Acc| {
        let mut t = sum
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *t = merge(*t, acc);
    };
    let lock = |w: usize| {
        ends[w]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    // A worker takes rows from the head of its list, up to `GROUP` at a time, their
    // scans interleaved (`run_group`), one row at a time as each row's Binary TV pass
    // ends; with its list empty, it takes single rows from the tail of another's (the
    // shortest rows left). Rows' costs are only estimates (the adaptive budget's
    // selection costs more in some rows than in others), and a helper may start late:
    // 16 x 16384 at two threads, against one shared queue handing out groups of four
    // while a group per thread was left (alternating calls in one process, medians):
    // 330-339 -> 283-304 us.
    let step = |me: usize| -> Option<Acc> {
        let mut own = || {
            let mut e = lock(me);
            let (head, tail) = *e;
            (head < tail).then(|| {
                e.0 = head + 1;
                drop(e);
                take(lists[me][head])
            })
        };
        if let Some(first) = own() {
            let mut first = Some(first);
            return Some(run_group(params, input, || first.take().or_else(&mut own)));
        }
        (1..workers).find_map(|off| {
            let other = (me + off) % workers;
            let mut e = lock(other);
            let (head, tail) = *e;
            (head < tail).then(|| {
                e.1 = tail - 1;
                drop(e);
                run_job(params, input, take(lists[other][tail - 1]))
            })
        })
    };
    let step = &step;
    running.store(helpers, Ordering::SeqCst);
    CALLS.fetch_add(1, Ordering::Release); // ends the helpers' linger (below)
    pool.in_place_scope(|s| {
        for h in 0..helpers {
            let (running, add) = (&running, &add);
            s.spawn(move |_| {
                let mut acc: Acc = (None, [0; 5]);
                while let Some(r) = step(h + 1) {
                    acc = merge(acc, r);
                }
                add(acc);
                running.fetch_sub(1, Ordering::Release);
            });
        }
        let mut acc: Acc = (None, [0; 5]);
        while let Some(r) = step(0) {
            acc = merge(acc, r);
        }
        add(acc);
        // The queue is empty: at most one row per helper is left. Wait for it awake
        // (up to 0.5 ms), then let the scope block.
        let start = std::time::Instant::now();
        let mut spins = 0u32;
        while running.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(256) && start.elapsed() > std::time::Duration::from_micros(500)
            {
                break;
            }
        }
    });
    linger(pool, helpers);
    if longest_row(&layout) > KEEP_ROW_BUFFERS_UP_TO {
        pool.broadcast(|_| free_buffers());
        free_buffers();
    }
    let (err, counts) = sum
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match err {
        Some(e) => Err(e),
        None => Ok(counts),
    }
}

/// Calls of `run_here_and_on` so far (the helpers' linger watches it).
static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How long a helper stays awake after a call, waiting for the next one. 100 us was
/// too short: between two calls on a 256 x 8192 batch the caller spends ~100 us outside
/// the kernel (the wrapper, freeing the previous 2 MB mask with its caches cold), and
/// every call then waited 85-110 us for its helper to wake (1.3-1.7 us at 500 us).
pub const LINGER: std::time::Duration = std::time::Duration::from_micros(500);

/// Keeps `helpers` pool threads awake (spinning) for up to `LINGER` after a call, or
/// until the next call starts: a sleeping thread takes tens of microseconds to wake
/// in a VM, which a loop of calls (a training step, a benchmark) would pay every call.
/// The same policy as OpenMP runtimes' spin-wait (libgomp spins ~300k cycles, Intel's
/// runtime 200 ms); it costs at most `LINGER` of a core per call, and never delays the
/// caller.
fn linger(pool: &rayon::ThreadPool, helpers: usize) {
    use std::sync::atomic::Ordering;
    let call = CALLS.load(Ordering::Acquire);
    for _ in 0..helpers {
        pool.spawn(move || {
            let start = std::time::Instant::now();
            let mut spins = 0u32;
            while CALLS.load(Ordering::Acquire) == call {
                std::hint::spin_loop();
                spins += 1;
                if spins.is_multiple_of(64) && start.elapsed() > LINGER {
                    break;
                }
            }
        });
    }
}

fn make_jobs<'a>(output: BatchOutput<'a>, layout: &Layout) -> Vec<RowJob<'a>> {
    let masks = split_rows(output.mask, layout);
    let reasons = split_optional(output.reason, layout);
    let thresholds = split_optional(output.threshold, layout);
    let gates = split_optional(output.gate, layout);
    let budgets: Vec<Option<&mut f64>> = match output.row_budget {
        Some(b) => b.iter_mut().map(Some).collect(),
        None => (0..layout.num_rows()).map(|_| None).collect(),
    };
    masks
        .into_iter()
        .zip(reasons)
        .zip(thresholds)
        .zip(gates)
        .zip(budgets)
        .enumerate()
        .map(
            |(row, ((((mask, reason), threshold), gate), budget))| RowJob {
                row,
                split: false,
                window: None,
                out: RowOutput {
                    mask,
                    reason,
                    threshold,
                    gate,
                },
                budget,
            },
        )
        .collect()
}

/// Computes the mask for every row on the current rayon pool. Returns the number of
/// positions with each reason code, or the bad value with the smallest row.
pub fn compute_batch(
    params: &Params,
    input: &BatchInput,
    output: BatchOutput,
) -> Result<[u64; 5], BadValue> {
    compute_batch_with(Parallelism::Pool, params, input, output)
}

type Acc = (Option<BadValue>, [u64; 5]);

fn merge(a: Acc, b: Acc) -> Acc {
    let err = match (a.0, b.0) {
        (Some(x), Some(y)) => Some(if x.row <= y.row { x } else { y }),
        (x, y) => x.or(y),
    };
    let mut counts = a.1;
    for (c, d) in counts.iter_mut().zip(b.1) {
        *c += d;
    }
    (err, counts)
}

fn run_job(params: &Params, input: &BatchInput, job: RowJob) -> Acc {
    match run_row(params, input, job) {
        Ok(s) => (None, s.counts),
        Err(e) => (Some(e), [0; 5]),
    }
}

/// Computes the mask for every row, serially on the calling thread or on the current
/// rayon pool. Returns the number of positions with each reason code, or the bad value
/// with the smallest row (the same whatever `par` and the thread count).
pub fn compute_batch_with(
    par: Parallelism,
    params: &Params,
    input: &BatchInput,
    output: BatchOutput,
) -> Result<[u64; 5], BadValue> {
    let layout = input.layout;
    let threads = match par {
        Parallelism::Serial => 1,
        Parallelism::Pool => rayon::current_num_threads(),
    };
    // Few rows for the pool: split long rows' Binary TV pass too (same results).
    let split = threads > 1 && layout.num_rows() < 64 * threads;
    let mut jobs = make_jobs(output, &layout);
    for job in jobs.iter_mut() {
        job.split = split;
    }
    // Longest rows first (stable: ties keep the row order; results do not depend on the
    // order). Serially, so that a group's rows have similar lengths: its scan runs them
    // as the lanes of one vector up to the shortest (rows in their order, lengths
    // uniform in [L/4, L]: ~73% of the lanes busy). With few rows for the pool, so that
    // the last rows to start are short and the threads finish together.
    if par == Parallelism::Serial || split {
        for job in jobs.iter_mut() {
            job.window = row_window(input, job.row);
        }
        jobs.sort_by_cached_key(|job| std::cmp::Reverse(cost_of(input, job.row, &job.window)));
    }

    let (err, counts) = match par {
        Parallelism::Serial => {
            let mut acc: Acc = (None, [0; 5]);
            let mut rows = jobs.into_iter().peekable();
            while rows.peek().is_some() {
                acc = merge(acc, run_group(params, input, || rows.next()));
            }
            acc
        }
        Parallelism::Pool => run_queue(params, input, jobs, threads),
    };
    if longest_row(&layout) > KEEP_ROW_BUFFERS_UP_TO {
        match par {
            Parallelism::Serial => free_buffers(),
            Parallelism::Pool => release_row_buffers(),
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(counts),
    }
}

/// Runs the jobs in their order on `threads` workers of the current pool, each taking
/// the next job when it is free (a shared counter): with the longest rows first this
/// is the longest-processing-time-first schedule.
fn run_queue(params: &Params, input: &BatchInput, jobs: Vec<RowJob>, threads: usize) -> Acc {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let slots: Vec<Mutex<Option<RowJob>>> = jobs.into_iter().map(|j| Mutex::new(Some(j))).collect();
    let next = AtomicUsize::new(0);
    let total = Mutex::new((None, [0u64; 5]));
    let worker = || {
        let mut acc: Acc = (None, [0; 5]);
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = slots.get(i) else { break };
            let job = slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
                .expect("each job is taken once");
            acc = merge(acc, run_job(params, input, job));
        }
        let mut t = total
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *t = merge(*t, acc);
    };
    rayon::scope(|s| {
        for _ in 1..threads.min(slots.len()) {
            s.spawn(|_| worker());
        }
        worker();
    });
    total
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

mod flags;
#[cfg(test)]
mod tests;
