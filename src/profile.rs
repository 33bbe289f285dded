//! `REFRAG_PROFILE=1`: where a training step's time goes. Each [`mark`] waits for the device's
//! queued work and adds the time since the previous mark to the named phase; `refrag train`
//! logs the step's phases as `profile_s` in `train.jsonl`. The waits cost throughput (the GPU
//! idles at every mark), so it is off unless asked for.

use candle_core::Device;
use std::cell::RefCell;
use std::time::Instant;

/// The last mark's time and the seconds per phase so far.
type Clock = Option<(Instant, Vec<(&'static str, f64)>)>;

thread_local! {
    static PHASES: RefCell<Clock> = const { RefCell::new(None) };
}

/// Whether `REFRAG_PROFILE` is set (to anything but `0` or empty).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("REFRAG_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// Starts a step: the phases so far are dropped and the clock starts once the device is idle.
pub fn start(dev: &Device) {
    if enabled() {
        let _ = dev.synchronize();
        PHASES.with(|p| *p.borrow_mut() = Some((Instant::now(), Vec::new())));
    }
}

/// Ends the phase `name`: waits for the device, then adds the time since the last mark.
pub fn mark(dev: &Device, name: &'static str) {
    if enabled() {
        let _ = dev.synchronize();
        record(name);
    }
}

fn record(name: &'static str) {
    PHASES.with(|p| {
        if let Some((last, phases)) = p.borrow_mut().as_mut() {
            let now = Instant::now();
            let dt = (now - *last).as_secs_f64();
            *last = now;
            match phases.iter_mut().find(|(n, _)| *n == name) {
                Some((_, t)) => *t += dt,
                None => phases.push((name, dt)),
            }
        }
    });
}

/// The step's phases (seconds, in first-seen order), and the clock stopped; `None` when off.
pub fn take() -> Option<serde_json::Value> {
    PHASES.with(|p| {
        p.borrow_mut().take().map(|(_, phases)| {
            let mut m = serde_json::Map::new();
            for (n, t) in phases {
                m.insert(n.to_string(), ((t * 1e4).round() / 1e4).into());
            }
            serde_json::Value::Object(m)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_add_up_per_phase_and_take_clears() {
        // `enabled()` reads the environment once per process: drive the clock directly
        PHASES.with(|p| *p.borrow_mut() = Some((Instant::now(), Vec::new())));
        std::thread::sleep(std::time::Duration::from_millis(30));
        record("a");
        record("b");
        std::thread::sleep(std::time::Duration::from_millis(30));
        record("a");
        let v = take().unwrap();
        assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), ["a", "b"]);
        assert!(v["a"].as_f64().unwrap() >= 0.06 && v["a"].as_f64().unwrap() > v["b"].as_f64().unwrap());
        assert!(take().is_none());
    }
}
