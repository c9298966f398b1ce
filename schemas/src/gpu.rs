//! GPU models as users write them (`A100`, `a100-80gb`, `RTX 4090`) matched
//! against the names the driver reports (`NVIDIA A100-SXM4-80GB`,
//! `NVIDIA GeForce RTX 4090`): by family, case-insensitive.

/// Brand and filler words that say nothing about the model.
const FILLER: &[&str] = &[
    "nvidia",
    "geforce",
    "tesla",
    "quadro",
    "gpu",
    "generation",
    "graphics",
    "server",
    "workstation",
    "edition",
];
/// Words that make a different card of the same number (`RTX 4090 D`).
const VARIANTS: &[&str] = &[
    "ti", "super", "d", "laptop", "mobile", "maxq", "max", "q", "ada", "pro", "xt",
];

#[derive(Debug, Default, PartialEq, Eq)]
struct Tokens {
    words: Vec<String>,
    /// A memory size named in the text (`80GB` -> 80), in GiB.
    memory_gb: Option<u64>,
}

fn tokens(text: &str) -> Tokens {
    let lower = text.to_lowercase().replace("max-q", "maxq");
    let mut out = Tokens::default();
    for word in lower.split(|c: char| !(c.is_ascii_alphanumeric() || c == '.')) {
        if word.is_empty() || FILLER.contains(&word) {
            continue;
        }
        // `80gb`, `80g`: a memory size.
        let digits = word.trim_end_matches("gb").trim_end_matches('g');
        if digits.len() < word.len()
            && !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
        {
            out.memory_gb = digits.parse().ok();
            continue;
        }
        // `rtx4090` -> `rtx` `4090`; `4090ti` -> `4090` `ti`.
        let mut rest = word;
        for family in ["rtx", "gtx", "gt"] {
            if let Some(number) = rest.strip_prefix(family) {
                if number.starts_with(|c: char| c.is_ascii_digit()) {
                    out.words.push(family.to_owned());
                    rest = number;
                    break;
                }
            }
        }
        let digits_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(digits_end);
        if number.len() >= 3 && ["ti", "super", "d"].contains(&suffix) {
            out.words.push(number.to_owned());
            out.words.push(suffix.to_owned());
        } else {
            out.words.push(rest.to_owned());
        }
    }
    out
}

thread_local! {
    /// Tokens of the few model names a scheduler sees, asked for once per
    /// device and request: made once each.
    static TOKENS: std::cell::RefCell<std::collections::HashMap<String, std::rc::Rc<Tokens>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

fn cached_tokens(text: &str) -> std::rc::Rc<Tokens> {
    TOKENS.with(|cache| {
        if let Some(t) = cache.borrow().get(text) {
            return t.clone();
        }
        let t = std::rc::Rc::new(tokens(text));
        let mut cache = cache.borrow_mut();
        // Names are few; anything else (users' spellings) must not grow it forever.
        if cache.len() >= 4096 {
            cache.clear();
        }
        cache.insert(text.to_owned(), t.clone());
        t
    })
}

/// Whether a GPU named `name` with `memory_mb` of memory is what `wanted`
/// asks for: every word of `wanted` is a word of the name (`sxm` matches
/// `sxm4`), the name has no variant word `wanted` does not (`RTX 4090` is
/// not a `RTX 4090 D`), and a memory size in `wanted` is the name's (or
/// the memory's, within 5 %, when the name gives none).
pub fn model_matches(wanted: &str, name: &str, memory_mb: u64) -> bool {
    let (want, have) = (cached_tokens(wanted), cached_tokens(name));
    let has = |w: &str| {
        have.words.iter().any(|h| h == w)
            || (w == "sxm" && have.words.iter().any(|h| h.starts_with("sxm")))
    };
    if !want.words.iter().all(|w| has(w)) {
        return false;
    }
    if have
        .words
        .iter()
        .any(|h| VARIANTS.contains(&h.as_str()) && !want.words.contains(h))
    {
        return false;
    }
    match want.memory_gb {
        None => true,
        Some(gb) => {
            let actual = have.memory_gb.unwrap_or_else(|| (memory_mb + 512) / 1024);
            let slack = (gb / 20).max(1);
            actual.abs_diff(gb) <= slack
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_match_by_family_as_users_write_them() {
        let cases = [
            ("A100", "NVIDIA A100-SXM4-80GB", 81920, true),
            ("a100-80gb", "NVIDIA A100-SXM4-80GB", 81920, true),
            ("A100 80G", "NVIDIA A100 80GB PCIe", 81920, true),
            ("a100-40gb", "NVIDIA A100-SXM4-80GB", 81920, false),
            ("a100-sxm", "NVIDIA A100 80GB PCIe", 81920, false),
            ("A10", "NVIDIA A100-SXM4-80GB", 81920, false),
            ("A10", "NVIDIA A10", 23028, true),
            ("H100", "NVIDIA H100 80GB HBM3", 81559, true),
            ("h100-80gb", "NVIDIA H100 80GB HBM3", 81559, true),
            ("H100", "NVIDIA H200", 143771, false),
            ("V100", "Tesla V100-SXM2-16GB", 16384, true),
            ("v100-32gb", "Tesla V100-SXM2-16GB", 16384, false),
            ("RTX 4090", "NVIDIA GeForce RTX 4090", 24564, true),
            ("rtx4090-24gb", "NVIDIA GeForce RTX 4090", 24564, true),
            ("4090", "NVIDIA GeForce RTX 4090", 24564, true),
            ("RTX 4090", "NVIDIA GeForce RTX 4090 D", 24564, false),
            (
                "RTX 4090",
                "NVIDIA GeForce RTX 4090 Laptop GPU",
                16376,
                false,
            ),
            ("RTX 3080", "NVIDIA GeForce RTX 3080 Ti", 12288, false),
            ("rtx3080ti", "NVIDIA GeForce RTX 3080 Ti", 12288, true),
            ("L40", "NVIDIA L40S", 46068, false),
            ("RTX 6000", "NVIDIA RTX A6000", 49140, false),
            ("A6000", "NVIDIA RTX A6000", 49140, true),
            ("T4", "Tesla T4", 15360, true),
            (
                "RTX PRO 6000",
                "NVIDIA RTX PRO 6000 Blackwell Server Edition",
                97887,
                true,
            ),
            ("RTX 6000", "NVIDIA RTX 6000 Ada Generation", 49140, false),
            (
                "RTX 6000",
                "NVIDIA RTX PRO 6000 Blackwell Server Edition",
                97887,
                false,
            ),
            (
                "RTX 6000 Ada",
                "NVIDIA RTX 6000 Ada Generation",
                49140,
                true,
            ),
            (
                "nvidia a100-sxm4-80gb",
                "NVIDIA A100-SXM4-80GB",
                81920,
                true,
            ),
        ];
        for (wanted, name, mem, expected) in cases {
            assert_eq!(
                model_matches(wanted, name, mem),
                expected,
                "{wanted:?} vs {name:?}"
            );
        }
    }
}
