//! Prompts grouped by the tokens they begin with. Under a causal mask a token's hidden states depend only on
//! the tokens up to it, so prompts that share their first tokens share those tokens' keys and values in every
//! layer: computed once per group, they serve every member (a class name in each of a template's prompts:
//! "a photo of a" before each of 397 names).

/// A run of prompts (indices into the list given) whose first `shared` tokens are the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixGroup {
    /// Tokens every member begins with; each member has at least one more. Zero: nothing shared.
    pub shared: usize,
    /// The members, in token order.
    pub members: Vec<usize>,
}

/// Fewer shared tokens than this are not worth a prefix pass of their own (every CLIP prompt begins with
/// `<|startoftext|>`).
const MIN_SHARED: usize = 2;

/// The prompts in groups: sorted by their tokens, each group a run from its first member, extended while the
/// tokens it saves, (members − 1) × shared, do not shrink (a longer run may share fewer tokens). Each member
/// keeps at least its last, pooled, token to compute.
pub fn prefix_groups(prompts: &[&[u32]]) -> Vec<PrefixGroup> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&p| prompts[p]);
    let common = |a: usize, b: usize| prompts[a].iter().zip(prompts[b]).take_while(|(x, y)| x == y).count();
    let mut groups = Vec::new();
    let mut at = 0;
    while at < order.len() {
        let first = order[at];
        let (mut end, mut shared) = (at + 1, 0);
        while end < order.len() {
            let next = order[end];
            // Capped so that `first` keeps its last token to compute. `next` sorts after `first`, so sharing
            // that much it is at least as long, and keeps one too.
            let with_next = common(first, next).min(prompts[first].len() - 1);
            let candidate = if end == at + 1 { with_next } else { shared.min(with_next) };
            let saved = |members: usize, shared: usize| (members - 1) * shared;
            if candidate < MIN_SHARED || saved(end - at + 1, candidate) < saved(end - at, shared) {
                break;
            }
            (end, shared) = (end + 1, candidate);
        }
        groups.push(PrefixGroup { shared, members: order[at..end].to_vec() });
        at = end;
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_share_their_longest_common_beginning() {
        let prompts: Vec<&[u32]> = vec![
            &[1, 5, 6, 7, 9, 2], // a photo of a X.
            &[1, 5, 6, 8, 9, 2], // a photo of the X.
            &[1, 5, 6, 7, 4, 2], // a photo of a Y.
            &[1, 3, 2],          // alone
            &[1, 5, 6, 8, 4, 2], // a photo of the Y.
            &[1, 5, 6, 7, 4, 4, 2],
        ];
        let groups = prefix_groups(&prompts);
        // After [1, 3, 2], alone: [1, 5, 6, 7, 4] twice saves 5 tokens, [1, 5, 6, 7] three times 8, [1, 5, 6]
        // four and five times 9 and 12.
        let want =
            vec![PrefixGroup { shared: 0, members: vec![3] }, PrefixGroup { shared: 3, members: vec![2, 5, 0, 4, 1] }];
        assert_eq!(groups, want);
        // Every prompt in exactly one group, each member longer than what it shares.
        let mut all: Vec<usize> = groups.iter().flat_map(|g| g.members.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..prompts.len()).collect::<Vec<_>>());
    }

    #[test]
    fn a_member_keeps_its_last_token_and_short_beginnings_are_not_shared() {
        // Identical prompts: they share all but the last token.
        let same: Vec<&[u32]> = vec![&[1, 5, 6, 2], &[1, 5, 6, 2]];
        assert_eq!(prefix_groups(&same), vec![PrefixGroup { shared: 3, members: vec![0, 1] }]);
        // Only <|startoftext|> in common: nothing shared, each alone.
        let apart: Vec<&[u32]> = vec![&[1, 5, 2], &[1, 6, 2]];
        let alone = |m| PrefixGroup { shared: 0, members: vec![m] };
        assert_eq!(prefix_groups(&apart), vec![alone(0), alone(1)]);
    }
}
