//! Weighted choice among a rule's backendRefs: one decision per request, with weight/total of the
//! requests going to each entry and none to weight 0.
use std::sync::{Mutex, PoisonError};

use rand::{Rng, seq::SliceRandom as _};

/// Beyond this many tickets per round (weights reduced by their common divisor), [`WeightedPicker`]
/// draws independently instead of dealing a deck, to bound its memory.
const MAX_DECK: u32 = 1000;

/// Picks an index with probability weight/total; `None` when every weight is 0 (no traffic may go to
/// a weight-0 entry, so there is nothing to choose).
pub fn pick_weighted<T>(
    items: &[T],
    weight: impl Fn(&T) -> u32,
    rng: &mut impl Rng,
) -> Option<usize> {
    let total: u64 = items.iter().map(|i| u64::from(weight(i))).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = rng.random_range(0..total);
    for (idx, item) in items.iter().enumerate() {
        let w = u64::from(weight(item));
        if ticket < w {
            return Some(idx);
        }
        ticket -= w;
    }
    None
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Stratified weighted choice: each round deals a shuffled deck holding every entry as often as its
/// weight (reduced by the weights' common divisor, so 70/30 is a deck of 7 + 3). Every round is exact,
/// so a 70/30 split is 70/30 after tens of requests rather than only on average; the shuffle keeps
/// the order unpredictable, so no request pattern lines up with one backend (as a round-robin
/// would let it). Shared by all connections; the lock is held only to draw a card.
pub struct WeightedPicker {
    /// Weights divided by their greatest common divisor; empty deck when the total is too large.
    reduced: Vec<u32>,
    weights: Vec<u32>,
    deck: Mutex<Vec<u32>>,
}

impl WeightedPicker {
    pub fn new(weights: Vec<u32>) -> Self {
        let divisor = weights.iter().copied().fold(0, gcd);
        let reduced: Vec<u32> = if divisor == 0 {
            Vec::new()
        } else {
            weights.iter().map(|w| w / divisor).collect()
        };
        let total: u64 = reduced.iter().map(|w| u64::from(*w)).sum();
        Self {
            reduced: if total <= u64::from(MAX_DECK) {
                reduced
            } else {
                Vec::new()
            },
            weights,
            deck: Mutex::new(Vec::new()),
        }
    }

    pub fn weights(&self) -> &[u32] {
        &self.weights
    }

    pub fn pick(&self, rng: &mut impl Rng) -> Option<usize> {
        if self.weights.iter().all(|w| *w == 0) {
            return None;
        }
        if self.reduced.is_empty() {
            return pick_weighted(&self.weights, |w| *w, rng);
        }
        let mut deck = self.deck.lock().unwrap_or_else(PoisonError::into_inner);
        if deck.is_empty() {
            for (i, w) in self.reduced.iter().enumerate() {
                let i = u32::try_from(i).unwrap_or(u32::MAX);
                deck.extend(std::iter::repeat_n(i, *w as usize));
            }
            deck.shuffle(rng);
        }
        deck.pop().map(|i| i as usize)
    }
}

impl Clone for WeightedPicker {
    /// A clone starts a fresh round: the deck is per table, not carried across tables.
    fn clone(&self) -> Self {
        Self::new(self.weights.clone())
    }
}

impl std::fmt::Debug for WeightedPicker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightedPicker")
            .field("weights", &self.weights)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng as _, rngs::StdRng};

    use super::*;

    #[test]
    fn independent_choice_follows_weights() {
        // HTTPBackendRef.weight: "computed as weight/(sum of all weights in this BackendRefs list)";
        // "If weight is set to 0, no traffic should be forwarded for this entry."
        let mut rng = StdRng::seed_from_u64(7);
        let weights = [70u32, 0, 30];
        let mut counts = [0u32; 3];
        let n = 100_000;
        for _ in 0..n {
            let i = pick_weighted(&weights, |w| *w, &mut rng).expect("some weight");
            counts[i] += 1;
        }
        assert_eq!(counts[1], 0, "weight 0 got traffic");
        let share = f64::from(counts[0]) / f64::from(n);
        assert!((share - 0.7).abs() < 0.01, "70/30 gave {counts:?}");
        assert_eq!(pick_weighted(&[0u32, 0], |w| *w, &mut rng), None);
        assert_eq!(pick_weighted::<u32>(&[], |w| *w, &mut rng), None);
        assert_eq!(pick_weighted(&[0u32, 5], |w| *w, &mut rng), Some(1));
    }

    #[test]
    fn every_round_of_the_deck_is_exact() {
        let mut rng = StdRng::seed_from_u64(1);
        let picker = WeightedPicker::new(vec![70, 0, 30]);
        // Reduced to 7/0/3: every 10 consecutive picks hold exactly 7, 0 and 3.
        for _ in 0..50 {
            let mut counts = [0; 3];
            for _ in 0..10 {
                counts[picker.pick(&mut rng).expect("pick")] += 1;
            }
            assert_eq!(counts, [7, 0, 3]);
        }
        assert_eq!(WeightedPicker::new(vec![0, 0]).pick(&mut rng), None);
        assert_eq!(WeightedPicker::new(vec![]).pick(&mut rng), None);
        assert_eq!(WeightedPicker::new(vec![0, 9]).pick(&mut rng), Some(1));
    }

    #[test]
    fn deck_order_is_shuffled() {
        let mut rng = StdRng::seed_from_u64(2);
        let picker = WeightedPicker::new(vec![1, 1]);
        let rounds: Vec<[usize; 2]> = (0..64)
            .map(|_| {
                [
                    picker.pick(&mut rng).expect("pick"),
                    picker.pick(&mut rng).expect("pick"),
                ]
            })
            .collect();
        // Not a fixed alternation: both orders occur.
        assert!(
            rounds.contains(&[0, 1]) && rounds.contains(&[1, 0]),
            "{rounds:?}"
        );
    }

    #[test]
    fn large_totals_fall_back_to_independent_draws() {
        let mut rng = StdRng::seed_from_u64(3);
        let picker = WeightedPicker::new(vec![999_983, 1_000_000]);
        assert!(picker.reduced.is_empty());
        let mut counts = [0u32; 2];
        for _ in 0..20_000 {
            counts[picker.pick(&mut rng).expect("pick")] += 1;
        }
        let share = f64::from(counts[0]) / 20_000.0;
        assert!((share - 0.5).abs() < 0.02, "{counts:?}");
    }
}
