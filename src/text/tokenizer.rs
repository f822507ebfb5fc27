//! CLIP's byte-level BPE tokenizer, encoding as Hugging Face's `CLIPTokenizer` does (its `tokenizers`
//! backend, the one transformers loads): the text NFC-normalised, each run of whitespace made one space, and
//! lowercased; split into contractions, letter runs, single digits and runs of other non-space characters;
//! each piece's UTF-8 bytes mapped to GPT-2's printable characters, its last symbol marked `</w>`, and merged
//! by rank; `<|startoftext|>` before and `<|endoftext|>` after.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// The start and end tokens.
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// Marks a word's last symbol.
const END_OF_WORD: &str = "</w>";
/// CLIP's pieces: contractions, letter runs, one digit, runs of anything else but whitespace (the pattern of
/// the `Split` pre-tokenizer in every CLIP `tokenizer.json`, less the special tokens, refused beforehand).
const PIECES: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The files a CLIP tokenizer is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerFiles {
    /// `vocab.json` and `merges.txt`.
    VocabAndMerges,
    /// `tokenizer.json` alone.
    TokenizerJson,
}

impl std::fmt::Display for TokenizerFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenizerFiles::VocabAndMerges => "vocab.json + merges.txt",
            TokenizerFiles::TokenizerJson => "tokenizer.json",
        })
    }
}

/// A CLIP tokenizer read from `vocab.json` and `merges.txt`, or `tokenizer.json`.
pub struct ClipTokenizer {
    /// (left, right) token ids → (rank, merged token id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Each byte's symbol, alone and as a word's last.
    byte_ids: [u32; 256],
    byte_end_ids: [u32; 256],
    bos: u32,
    eos: u32,
    pieces: Regex,
}

impl ClipTokenizer {
    /// Which of CLIP's tokenizer files `dir` holds, the ones [`open`](Self::open) reads.
    pub fn files_in(dir: &Path) -> Option<TokenizerFiles> {
        // A link to nothing (an unfinished download in the Hugging Face cache) counts, for `open` to name it.
        let here = |name: &str| dir.join(name).is_file() || crate::hub_cache::is_dangling(&dir.join(name));
        if here("vocab.json") && here("merges.txt") {
            Some(TokenizerFiles::VocabAndMerges)
        } else if here("tokenizer.json") {
            Some(TokenizerFiles::TokenizerJson)
        } else {
            None
        }
    }

    /// Reads `dir/vocab.json` and `dir/merges.txt`, as CLIP checkpoints on the Hub have them, else the same
    /// from `dir/tokenizer.json` (the `tokenizers` library's one file).
    pub fn open(dir: &Path) -> Result<Self> {
        let read = |p: &PathBuf| -> Result<String> {
            crate::hub_cache::check_not_dangling(p)?;
            std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))
        };
        let json_path = match Self::files_in(dir) {
            Some(TokenizerFiles::VocabAndMerges) => {
                let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
                let vocab: HashMap<String, u32> = serde_json::from_str(&read(&vocab_path)?)
                    .with_context(|| format!("{}: expected a JSON object of token → id", vocab_path.display()))?;
                return Self::from_parts(vocab, &read(&merges_path)?, &vocab_path, &merges_path);
            }
            Some(TokenizerFiles::TokenizerJson) => dir.join("tokenizer.json"),
            None => bail!(
                "{}: no tokenizer here (vocab.json and merges.txt, or tokenizer.json, as CLIP checkpoints on the Hub \
                 have them)",
                dir.display()
            ),
        };
        let json: serde_json::Value = serde_json::from_str(&read(&json_path)?)
            .with_context(|| format!("{}: invalid JSON", json_path.display()))?;
        let model = &json["model"];
        ensure!(
            model["type"] == "BPE" && model["end_of_word_suffix"] == END_OF_WORD,
            "{}: not CLIP's tokenizer (a BPE model whose words end in {END_OF_WORD})",
            json_path.display()
        );
        let vocab: HashMap<String, u32> = serde_json::from_value(model["vocab"].clone())
            .with_context(|| format!("{}: model.vocab is no object of token → id", json_path.display()))?;
        // Merges as "left right" strings (older files) or [left, right] pairs.
        let merges = model["merges"].as_array().with_context(|| format!("{}: no model.merges", json_path.display()))?;
        let mut text = String::new();
        for (n, merge) in merges.iter().enumerate() {
            let pair = match merge {
                serde_json::Value::String(line) => Some(line.clone()),
                serde_json::Value::Array(pair) => match (pair.first().and_then(|v| v.as_str()), pair.get(1)) {
                    (Some(l), Some(serde_json::Value::String(r))) if pair.len() == 2 && !l.contains(' ') => {
                        Some(format!("{l} {r}"))
                    }
                    _ => None,
                },
                _ => None,
            };
            let pair =
                pair.with_context(|| format!("{}: model.merges[{n}] is no pair of tokens", json_path.display()))?;
            text.push_str(&pair);
            text.push('\n');
        }
        Self::from_parts(vocab, &text, &json_path, &json_path)
    }

    fn from_parts(
        vocab: HashMap<String, u32>,
        merges_text: &str,
        vocab_path: &Path,
        merges_path: &Path,
    ) -> Result<Self> {
        let id = |token: &str| -> Result<u32> {
            vocab.get(token).copied().with_context(|| format!("{}: no token '{token}'", vocab_path.display()))
        };
        // A byte the vocabulary lacks becomes the unknown token, `<|endoftext|>` in CLIP's tokenizers, and
        // takes part in no merge (a small test vocabulary lacks most; CLIP's has all 512).
        let eos = id(EOS)?;
        let (mut byte_ids, mut byte_end_ids) = ([eos; 256], [eos; 256]);
        for (b, c) in byte_symbols().into_iter().enumerate() {
            byte_ids[b] = vocab.get(&c.to_string()).copied().unwrap_or(eos);
            byte_end_ids[b] = vocab.get(&format!("{c}{END_OF_WORD}")).copied().unwrap_or(eos);
        }
        let mut merges = HashMap::new();
        let lines = merges_text.lines().enumerate().filter(|(_, l)| !l.starts_with("#version") && !l.trim().is_empty());
        for (rank, (n, line)) in lines.enumerate() {
            let mut parts = line.split(' ');
            let (Some(left), Some(right), None) = (parts.next(), parts.next(), parts.next()) else {
                bail!(
                    "{}: line {}: expected two symbols separated by a space, got {line:?}",
                    merges_path.display(),
                    n + 1
                );
            };
            let ids = (id(left), id(right), id(&format!("{left}{right}")));
            let (Ok(l), Ok(r), Ok(m)) = ids else {
                bail!("{}: line {}: the merge {line:?} names a token not in vocab.json", merges_path.display(), n + 1);
            };
            merges.entry((l, r)).or_insert((rank as u32, m));
        }
        let pieces = Regex::new(PIECES).expect("the piece pattern is valid");
        Ok(ClipTokenizer { bos: id(BOS)?, eos, merges, byte_ids, byte_end_ids, pieces })
    }

    /// The tokens of `text`, between `<|startoftext|>` and `<|endoftext|>`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let normalized = normalize(text);
        for special in [BOS, EOS] {
            // transformers would take it for the special token; a prompt has no business holding one.
            ensure!(!normalized.contains(special), "{text:?}: holds CLIP's special token {special}");
        }
        let mut ids = vec![self.bos];
        for piece in self.pieces.find_iter(&normalized) {
            self.merge_word(piece.as_str().as_bytes(), &mut ids);
        }
        ids.push(self.eos);
        Ok(ids)
    }

    /// Appends the tokens of one piece: its bytes' symbols, the last one marked, merged lowest rank first
    /// (the leftmost of equal ranks), as `tokenizers`' BPE does.
    fn merge_word(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let last = bytes.len() - 1;
        let mut word: Vec<u32> = bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| if i == last { self.byte_end_ids[b as usize] } else { self.byte_ids[b as usize] })
            .collect();
        loop {
            let best = word
                .windows(2)
                .enumerate()
                .filter_map(|(i, pair)| self.merges.get(&(pair[0], pair[1])).map(|&(rank, merged)| (rank, i, merged)))
                .min();
            let Some((_, i, merged)) = best else { break };
            word[i] = merged;
            word.remove(i + 1);
        }
        out.extend(word);
    }
}

/// NFC, each run of whitespace one space, lowercase: the normalizer of CLIP's `tokenizer.json`. Lowercasing
/// is per character, as `tokenizers` does it (no final-sigma rule).
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for c in text.nfc() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            out.extend(c.to_lowercase());
            in_space = false;
        }
    }
    out
}

/// GPT-2's printable character for each byte: printable Latin-1 bytes stand for themselves, the others for
/// 256, 257, ... in byte order.
fn byte_symbols() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut symbols = ['\0'; 256];
    let mut next = 256;
    for b in 0..256u32 {
        let code = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        symbols[b as usize] = char::from_u32(code).expect("below 0x200");
    }
    symbols
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte symbol, each also as a word's last, and the merges given; with its vocabulary.
    fn tiny(merges: &[(&str, &str)]) -> (ClipTokenizer, HashMap<String, u32>) {
        let mut tokens: Vec<String> = byte_symbols().iter().map(|c| c.to_string()).collect();
        tokens.extend(byte_symbols().iter().map(|c| format!("{c}{END_OF_WORD}")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.extend([BOS.to_string(), EOS.to_string()]);
        let vocab: HashMap<String, u32> = tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
        let text: String = merges.iter().map(|(a, b)| format!("{a} {b}\n")).collect();
        let merges = format!("#version: 0.2\n{text}");
        (ClipTokenizer::from_parts(vocab.clone(), &merges, Path::new("v"), Path::new("m")).unwrap(), vocab)
    }

    #[test]
    fn byte_symbols_are_gpt2s() {
        let s = byte_symbols();
        assert_eq!((s[b'a' as usize], s[b' ' as usize], s[0], s[0xad], s[0xff]), ('a', 'Ġ', 'Ā', 'Ń', 'ÿ'));
    }

    #[test]
    fn whitespace_runs_become_one_space_and_case_folds() {
        assert_eq!(normalize("  A\t\tB\nC  "), " a b c ");
        assert_eq!(normalize("e\u{301}"), "é");
    }

    #[test]
    fn merges_apply_lowest_rank_first() {
        // "abc": (b, c</w>) ranks before (a, b), so "a" + "bc</w>", not "ab" + "c</w>".
        let (t, vocab) = tiny(&[("b", "c</w>"), ("a", "b")]);
        assert_eq!(t.encode("abc").unwrap(), [vocab[BOS], vocab["a"], vocab["bc</w>"], vocab[EOS]]);
        let (t, vocab) = tiny(&[("a", "b"), ("b", "c</w>")]);
        assert_eq!(t.encode("abc").unwrap()[1..3], [vocab["ab"], vocab["c</w>"]]);
    }

    #[test]
    fn a_merge_naming_an_unknown_token_is_refused() {
        let mut vocab: HashMap<String, u32> =
            byte_symbols().iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
        vocab.extend(byte_symbols().iter().enumerate().map(|(i, c)| (format!("{c}</w>"), 256 + i as u32)));
        vocab.extend([(BOS.to_string(), 512), (EOS.to_string(), 513)]);
        let e = ClipTokenizer::from_parts(vocab, "a b\n", Path::new("v.json"), Path::new("m.txt")).err().unwrap();
        assert_eq!(e.to_string(), "m.txt: line 1: the merge \"a b\" names a token not in vocab.json");
    }

    #[test]
    fn a_prompt_holding_a_special_token_is_refused() {
        let e = tiny(&[]).0.encode("a <|EndOfText|> b").err().unwrap();
        assert!(e.to_string().contains("special token <|endoftext|>"), "{e}");
    }
}
