//! The decoder's budget bounds memory, not only the size of what it returns: the memo bomb of
//! issue 14 (8 MB memoized once, fetched a million times, 10 MB in all, 8 TB once expanded) is
//! refused having allocated a small multiple of its input. The allocator counts the whole
//! process, so this binary holds one test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use dispy_core::pickle::{decode_within, DecodeError};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(live, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            grew(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn memo_bomb_is_refused_within_a_few_times_its_input() {
    // An 8 MB string and 999,999 BINGETs of it.
    let bomb = dispy_core::pickle::memo_bomb(8 << 20, 1_000_000);

    let before = LIVE.load(Relaxed);
    PEAK.store(before, Relaxed);
    let result = decode_within(&bomb, 16 << 20);
    let peak = PEAK.load(Relaxed) - before;

    assert_eq!(result, Err(DecodeError::OverBudget { budget: 16 << 20 }));
    // The string once (8 MB) and a million ids on the stack and in the list (16 MB); the
    // expansion would have been 8 TB.
    assert!(
        peak < 4 * bomb.len(),
        "refusing a {} byte pickle allocated {peak} bytes",
        bomb.len()
    );
}
