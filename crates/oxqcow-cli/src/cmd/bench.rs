//! `oxqcow bench`: qemu-img bench. Sends `count` requests of `bufsize`
//! bytes, `depth` at a time, at offsets that advance by `step` from
//! `offset` (wrapping inside the image exactly as qemu-img computes them),
//! or with `--random` at step-aligned offsets drawn from a seeded PRNG.
//!
//! Queue depth is real concurrency: `depth` threads (at most
//! [`MAX_WORKERS`]) share the one open image and take request numbers from
//! a shared counter, so request `i` always goes to the same offset however
//! the threads interleave. With `--flush-interval` the queue is drained and
//! the image flushed after every interval (or, with `--no-drain`, the
//! thread completing every interval-th request flushes while the others go
//! on).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::Instant;

use oxqcow::qemu_syntax::SizeError;
use oxqcow::{BlockDevice, Image};

use crate::app::ctx::Ctx;
use crate::app::getopt::{self, HasArg, Opt, Parsed};
use crate::app::io_open::{open, OpenSpec};
use crate::app::messages::errno_text;
use crate::app::numbers::{cvtnum, strtoul0};
use crate::app::qemu_opts::split_noisily;
use crate::app::CommonOpts;

/// Most threads one run uses; deeper queues share them.
pub const MAX_WORKERS: u64 = 256;

const INT_MAX: u64 = i32::MAX as u64;

const OPTIONS: &[Opt] = &[
    Opt::both('h', "help", HasArg::No),
    Opt::long("flush-interval", HasArg::Required),
    Opt::long("image-opts", HasArg::No),
    Opt::long("pattern", HasArg::Required),
    Opt::long("no-drain", HasArg::No),
    Opt::both('U', "force-share", HasArg::No),
    Opt::long("random", HasArg::No),
    Opt::long("seed", HasArg::Required),
];

fn help(prog: &str) -> String {
    format!(
        "Run simple image benchmark.  Usage:\n\n  \
         {prog} bench [-f FMT | --image-opts] [-t CACHE] [-c COUNT] [-d DEPTH]\n        \
         [-o OFFSET] [-s BUFFER_SIZE] [-S STEP_SIZE] [-i AIO] [-n] [-U] [-q]\n        \
         [-w [--pattern PATTERN] [--flush-interval INTERVAL [--no-drain]]]\n        \
         [--random [--seed SEED]] FILE\n\n\
         \x20 -c COUNT       number of requests (default 75000)\n\
         \x20 -d DEPTH       requests in flight at once (default 64)\n\
         \x20 -o OFFSET      offset of the first request (default 0)\n\
         \x20 -s SIZE        bytes per request (default 4096)\n\
         \x20 -S STEP        distance between request offsets (default: SIZE)\n\
         \x20 -w             write instead of read, buffers filled with PATTERN\n\
         \x20 --random       random STEP-aligned offsets from OFFSET to the end of\n\
         \x20                the image instead of the linear pattern\n\
         \x20 --seed SEED    seed of the --random offsets (default 0)\n"
    )
}

/// What to send.
#[derive(Clone, Copy, Debug)]
struct Plan {
    count: u64,
    depth: u64,
    offset: u64,
    bufsize: u64,
    step: u64,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    drain: bool,
    random: bool,
    seed: u64,
    image_size: u64,
}

impl Plan {
    /// The offset of request `i`. Linear: the first request at `offset`,
    /// each next one `step` further, wrapped modulo the image size as
    /// qemu-img 10 wraps it (so a request may still run past the end and
    /// fail, as there). Random: `offset` plus a random multiple of `step`
    /// such that the request fits in the image.
    fn offset_of(&self, i: u64) -> u64 {
        if self.random {
            let room = self.image_size.checked_sub(self.bufsize).and_then(|r| r.checked_sub(self.offset));
            let slots = room.map_or(1, |r| r / self.step + 1);
            return self.offset + splitmix64(self.seed.wrapping_add(i)) % slots * self.step;
        }
        if i == 0 || self.image_size == 0 {
            return self.offset;
        }
        let m = u128::from(self.image_size);
        ((u128::from(self.offset) + u128::from(i) * u128::from(self.step)) % m) as u64
    }
}

/// SplitMix64: a small, well-mixed PRNG; request `i` uses the output for
/// `seed + i`, so offsets do not depend on thread scheduling.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A number in `[min, max]` with qemu-img's messages; `size` selects its
/// size syntax (suffixes, fractions: qemu-img's `cvtnum`) over C integer
/// syntax (`0x`, octal).
fn ranged(name: &str, value: &str, min: u64, max: u64, size: bool) -> Result<u64, String> {
    if size {
        return cvtnum(name, value, min, max);
    }
    match strtoul0(value) {
        Err(SizeError::Invalid) => Err(format!("Invalid {name} specified: '{value}'.")),
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(format!("Invalid {name} specified. Must be between {min} and {max}.")),
    }
}

/// The plan, the open flags and the shared options of the command line,
/// taken in order (`Err`: the exit code, 0 after `-h`).
fn options(ctx: &Ctx, parsed: &Parsed) -> Result<(Plan, OpenSpec, CommonOpts), i32> {
    let mut plan = Plan {
        count: 75000,
        depth: 64,
        offset: 0,
        bufsize: 4096,
        step: 0,
        write: false,
        pattern: 0,
        flush_interval: 0,
        drain: true,
        random: false,
        seed: 0,
        image_size: 0,
    };
    let mut spec = OpenSpec::for_command_line();
    // qemu-img's defaults: read-only unless -w, writeback cache, no unmap.
    spec.read_only = true;
    spec.writethrough = false;
    spec.unmap = false;
    let mut common = CommonOpts::default();
    for (key, value) in &parsed.opts {
        let value = value.clone().unwrap_or_default();
        let res = match key.as_str() {
            "h" => {
                print!("{}", help(&ctx.prog));
                return Err(0);
            }
            "c" => ranged("request count", &value, 1, INT_MAX, false).map(|v| plan.count = v),
            "d" => ranged("queue depth", &value, 1, INT_MAX, false).map(|v| plan.depth = v),
            "o" => ranged("offset", &value, 0, i64::MAX as u64, true).map(|v| plan.offset = v),
            "s" => ranged("buffer size", &value, 1, INT_MAX, true).map(|v| plan.bufsize = v),
            "S" => ranged("step size", &value, 0, INT_MAX, true).map(|v| plan.step = v),
            "pattern" => ranged("pattern byte", &value, 0, 0xff, false).map(|v| plan.pattern = v as u8),
            "flush-interval" => ranged("flush interval", &value, 0, INT_MAX, false).map(|v| plan.flush_interval = v),
            "seed" => ranged("seed", &value, 0, u64::MAX, false).map(|v| plan.seed = v),
            "no-drain" => {
                plan.drain = false;
                Ok(())
            }
            "random" => {
                plan.random = true;
                Ok(())
            }
            "w" => {
                plan.write = true;
                spec.read_only = false;
                Ok(())
            }
            // Checked as it is met, with bench's own message.
            "t" => spec.apply_flag('t', &value).map_err(|_| "Invalid cache mode".to_string()),
            "i" => spec.apply_flag('i', &value),
            "n" => spec.apply_flag('k', ""),
            // -f, --image-opts, -U, and -q: qemu-img bench prints its lines even with -q.
            _ => common.consume(key, &value).map(|_| ()),
        };
        if let Err(msg) = res {
            ctx.error(&msg);
            return Err(1);
        }
    }
    Ok((plan, spec, common))
}

/// Runs `oxqcow bench ARGS`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let mut spec_opts = getopt::short_options("hc:d:f:ni:o:qs:S:t:wU");
    spec_opts.extend_from_slice(OPTIONS);
    let parsed = match getopt::parse(&format!("{} bench", ctx.argv0), args, &spec_opts) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("{msg}");
            eprintln!("Try '{} bench --help' for more info", ctx.argv0);
            return 1;
        }
    };
    let (mut plan, mut spec, common) = match options(ctx, &parsed) {
        Ok(o) => o,
        Err(code) => return code,
    };
    let [filename] = parsed.operands.as_slice() else {
        ctx.error("Expecting one image file name");
        eprintln!("Try '{} bench --help' for more info", ctx.argv0);
        return 1;
    };
    if !plan.write && plan.flush_interval > 0 {
        return ctx.fail("--flush-interval is only available in write tests");
    }
    if plan.flush_interval > 0 && plan.flush_interval < plan.depth {
        return ctx.fail("Flush interval can't be smaller than depth");
    }
    spec.force_share = common.force_share;
    let image = if common.image_opts {
        if common.format.is_some() {
            return ctx.fail("--image-opts and --format are mutually exclusive");
        }
        spec.options = split_noisily(&ctx.prog, filename);
        open(&spec, None, &Default::default())
    } else {
        if let Some(f) = common.format {
            spec.options.push(("driver".into(), f));
        }
        open(&spec, Some(filename), &Default::default())
    };
    let opened = match image {
        Ok(i) => i,
        Err(msg) => return ctx.fail(&format!("Could not open '{filename}': {msg}")),
    };
    plan.image_size = opened.image.len();
    if plan.step == 0 {
        plan.step = plan.bufsize;
    }
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        plan.count,
        if plan.write { "write" } else { "read" },
        plan.bufsize,
        plan.depth,
        plan.offset,
        plan.step
    );
    if plan.flush_interval > 0 {
        println!("Sending flush every {} requests", plan.flush_interval);
    }
    if plan.random {
        println!("Using random offsets (seed {}, aligned to {} bytes)", plan.seed, plan.step);
    }
    let start = Instant::now();
    let result = send(&opened.image, &plan);
    let elapsed = start.elapsed();
    if let Err(msg) = result {
        return ctx.fail(&msg);
    }
    println!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
    if let Err(msg) = opened.close() {
        return ctx.fail(&msg);
    }
    0
}

/// Sends every request of `plan` with `plan.depth` of them in flight.
fn send(image: &Image, plan: &Plan) -> Result<(), String> {
    let workers = plan.depth.min(plan.count).min(MAX_WORKERS) as usize;
    // With a drained flush interval the requests go in windows of that
    // size: all of one window complete, one flush, then the next window.
    let window = if plan.flush_interval > 0 && plan.drain { plan.flush_interval } else { plan.count };
    let write_buf = if plan.write { alloc(plan.bufsize, plan.pattern)? } else { Vec::new() };
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let error: Mutex<Option<String>> = Mutex::new(None);
    let barrier = Barrier::new(workers);
    let fail = |msg: String| {
        let mut e = error.lock().unwrap_or_else(|p| p.into_inner());
        e.get_or_insert(msg);
        failed.store(true, Ordering::SeqCst);
    };
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut read_buf = Vec::new();
                if !plan.write {
                    match alloc(plan.bufsize, 0) {
                        Ok(b) => read_buf = b,
                        Err(msg) => fail(msg),
                    }
                }
                let mut window_start = 0;
                while window_start < plan.count {
                    let window_end = (window_start + window).min(plan.count);
                    while !failed.load(Ordering::SeqCst) {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= window_end {
                            break;
                        }
                        let offset = plan.offset_of(i);
                        let res = if plan.write {
                            image.write_at(&write_buf, offset)
                        } else {
                            image.read_at(&mut read_buf, offset)
                        };
                        if let Err(e) = res {
                            fail(format!("Failed request: {}", errno_text(&e)));
                            break;
                        }
                        if plan.flush_interval > 0 && !plan.drain && (i + 1) % plan.flush_interval == 0 {
                            if let Err(e) = image.flush() {
                                fail(format!("Failed flush request: {}", errno_text(&e)));
                            }
                        }
                    }
                    // Every thread reaches this barrier for every window,
                    // so a failure cannot leave one waiting alone.
                    let leader = barrier.wait().is_leader();
                    if leader && window < plan.count && !failed.load(Ordering::SeqCst) {
                        if let Err(e) = image.flush() {
                            fail(format!("Failed request: {}", errno_text(&e)));
                        }
                    }
                    if leader {
                        next.store(window_end, Ordering::SeqCst);
                    }
                    barrier.wait();
                    if failed.load(Ordering::SeqCst) {
                        break;
                    }
                    window_start = window_end;
                }
            });
        }
    });
    match error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(msg) => Err(msg),
        None => Ok(()),
    }
}

/// A request buffer, failing cleanly when it cannot be allocated.
fn alloc(len: u64, fill: u8) -> Result<Vec<u8>, String> {
    let mut v = Vec::new();
    v.try_reserve_exact(len as usize).map_err(|_| format!("Could not allocate a {len}-byte request buffer"))?;
    v.resize(len as usize, fill);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(offset: u64, step: u64, bufsize: u64, image_size: u64) -> Plan {
        Plan {
            count: 0,
            depth: 1,
            offset,
            bufsize,
            step,
            write: false,
            pattern: 0,
            flush_interval: 0,
            drain: true,
            random: false,
            seed: 0,
            image_size,
        }
    }

    #[test]
    fn linear_offsets_wrap_as_qemu_img() {
        // qemu-img 10: next = (cur + step) % size; the first is as given.
        let p = plan(60 << 20, 1 << 20, 64 << 10, 64 << 20);
        let mut cur = p.offset;
        for i in 0..200 {
            assert_eq!(p.offset_of(i), cur, "request {i}");
            cur = (cur + p.step) % p.image_size;
        }
        assert_eq!(p.offset_of(4), 0);
        let tiny = plan(0, 4096, 65536, 65536);
        assert_eq!(tiny.offset_of(0), 0);
        assert_eq!(tiny.offset_of(1), 4096);
    }

    #[test]
    fn random_offsets_are_aligned_and_inside() {
        let mut p = plan(4096, 8192, 4096, 1 << 20);
        p.random = true;
        p.seed = 7;
        let offsets: Vec<u64> = (0..1000).map(|i| p.offset_of(i)).collect();
        for &o in &offsets {
            assert_eq!((o - 4096) % 8192, 0);
            assert!(o + 4096 <= 1 << 20);
        }
        let distinct: std::collections::HashSet<_> = offsets.iter().collect();
        assert!(distinct.len() > 50, "offsets should spread: {}", distinct.len());
        assert_eq!(offsets, (0..1000).map(|i| p.offset_of(i)).collect::<Vec<_>>());
        p.seed = 8;
        assert_ne!(offsets, (0..1000).map(|i| p.offset_of(i)).collect::<Vec<_>>());
    }
}
