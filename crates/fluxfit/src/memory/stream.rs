//! The streaming schedule: which groups of stages a streamed component holds, which it brings
//! in ahead of use, and which it drops, as a pure state machine over group indices. The
//! residency executes its steps over candle tensors (a prefetch thread doing the loads); the
//! planner executes the same steps over meta tensors, so both hold the same groups at the same
//! moments.
//!
//! Rules: at most `window` groups are held or in flight. Entering group g takes it (from the
//! prefetch in flight, or loaded now after dropping the least recently entered groups to make
//! room), then starts the prefetch of the next group — after the last group, when passes
//! repeat (the flow model runs once per step), the group the pass started with.

use std::collections::VecDeque;

/// One thing to do, in order, to enter a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Drop the held group.
    Evict(usize),
    /// The prefetch in flight is the group entered: wait for it and hold it.
    Arrive(usize),
    /// The prefetch in flight is another group (the network skipped one): wait for it and keep
    /// it as the least recently entered.
    KeepOldest(usize),
    /// Load the group now, on the network's thread.
    Load(usize),
    /// Start loading this group in the background.
    Prefetch(usize),
}

/// The state of one streamed component. See the module doc.
#[derive(Debug, Clone)]
pub struct StreamSchedule {
    groups: usize,
    window: usize,
    /// Held groups, least recently entered first.
    held: VecDeque<usize>,
    /// The group being prefetched.
    pending: Option<usize>,
    /// The group the network is in, and the one this pass started with.
    current: Option<usize>,
    start: Option<usize>,
    /// The network came back to `start` after a pass: passes repeat.
    repeats: bool,
}

impl StreamSchedule {
    /// `groups` groups, at most `window` held or in flight.
    pub fn new(groups: usize, window: usize) -> Self {
        Self {
            groups,
            window,
            held: VecDeque::new(),
            pending: None,
            current: None,
            start: None,
            repeats: false,
        }
    }

    /// Whether a stage of group `g` needs [`StreamSchedule::enter`] first.
    pub fn must_enter(&self, g: usize) -> bool {
        self.current != Some(g) || !self.held.contains(&g)
    }

    /// The steps that enter group `g`, in the order they must be done.
    pub fn enter(&mut self, g: usize) -> Vec<Step> {
        let mut steps = Vec::new();
        if self.current.is_some() && self.start == Some(g) {
            self.repeats = true;
        }
        self.start.get_or_insert(g);
        if let Some(pos) = self.held.iter().position(|&h| h == g) {
            self.held.remove(pos);
            self.held.push_back(g);
        } else {
            let mut arrived = false;
            if let Some(h) = self.pending.take() {
                if h == g {
                    arrived = true;
                    steps.push(Step::Arrive(g));
                } else {
                    self.held.push_front(h);
                    steps.push(Step::KeepOldest(h));
                }
            }
            if !arrived {
                self.evict(self.window.saturating_sub(1), g, &mut steps);
                steps.push(Step::Load(g));
            }
            self.held.push_back(g);
        }
        self.current = Some(g);
        if let (Some(next), true) = (self.next_to_prefetch(g), self.window >= 2) {
            self.evict(self.window - 1, g, &mut steps);
            self.pending = Some(next);
            steps.push(Step::Prefetch(next));
        }
        self.evict(self.window, g, &mut steps);
        steps
    }

    /// A group the executor could not keep (its background load failed).
    pub fn forget(&mut self, g: usize) {
        self.held.retain(|&h| h != g);
    }

    /// The prefetch just asked for could not be started.
    pub fn cancel_prefetch(&mut self) {
        self.pending = None;
    }

    /// After entering `g`: the following group or, after the last one when passes repeat, the
    /// group this pass started with; none if that is `g` or already held.
    fn next_to_prefetch(&self, g: usize) -> Option<usize> {
        let next = if g + 1 < self.groups {
            Some(g + 1)
        } else if self.repeats {
            self.start
        } else {
            None
        };
        next.filter(|n| *n != g && !self.held.contains(n))
    }

    /// Drops the least recently entered groups other than `keep` until at most `limit` are held
    /// or in flight.
    fn evict(&mut self, limit: usize, keep: usize, steps: &mut Vec<Step>) {
        while self.held.len() + usize::from(self.pending.is_some()) > limit {
            match self.held.iter().position(|&h| h != keep) {
                Some(pos) => {
                    let h = self.held.remove(pos).expect("position is in range");
                    steps.push(Step::Evict(h));
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Step::*;
    use super::*;

    /// The steps of entering each group in turn.
    fn run(groups: usize, window: usize, enters: &[usize]) -> Vec<Vec<Step>> {
        let mut s = StreamSchedule::new(groups, window);
        enters
            .iter()
            .map(|&g| if s.must_enter(g) { s.enter(g) } else { vec![] })
            .collect()
    }

    #[test]
    fn window_one_loads_each_group_after_dropping_the_last() {
        assert_eq!(
            run(3, 1, &[0, 1, 2, 0]),
            vec![
                vec![Load(0)],
                vec![Evict(0), Load(1)],
                vec![Evict(1), Load(2)],
                vec![Evict(2), Load(0)],
            ]
        );
    }

    #[test]
    fn window_two_prefetches_the_next_and_wraps_once_passes_repeat() {
        assert_eq!(
            run(3, 2, &[0, 1, 2, 0, 1]),
            vec![
                vec![Load(0), Prefetch(1)],
                vec![Arrive(1), Evict(0), Prefetch(2)],
                // The first pass's end: passes are not known to repeat yet.
                vec![Arrive(2)],
                // Back at the start: now they repeat.
                vec![Evict(1), Load(0), Evict(2), Prefetch(1)],
                vec![Arrive(1), Evict(0), Prefetch(2)],
            ]
        );
    }

    #[test]
    fn a_wider_window_keeps_groups_and_prefetches_the_start_after_the_last() {
        assert_eq!(
            run(2, 3, &[0, 1, 0, 1, 0]),
            vec![
                vec![Load(0), Prefetch(1)],
                vec![Arrive(1)],
                vec![],
                // 1 is held: entering it only moves it; 0 is held, so nothing is prefetched.
                vec![],
                vec![],
            ]
        );
    }

    #[test]
    fn a_skipped_group_keeps_the_prefetched_one_as_the_oldest() {
        assert_eq!(
            run(4, 2, &[0, 2]),
            vec![
                vec![Load(0), Prefetch(1)],
                vec![KeepOldest(1), Evict(1), Load(2), Evict(0), Prefetch(3)],
            ]
        );
    }

    #[test]
    fn a_failed_prefetch_is_loaded_when_needed() {
        let mut s = StreamSchedule::new(3, 2);
        assert_eq!(s.enter(0), vec![Load(0), Prefetch(1)]);
        s.cancel_prefetch();
        assert_eq!(s.enter(1), vec![Load(1), Evict(0), Prefetch(2)]);
    }
}
