//! Models and datasets named as on the Hugging Face Hub (`openai/clip-vit-base-patch32`,
//! `tanganke/sun397:test`), found in the local cache where transformers and datasets left them.
//!
//! Nothing is downloaded: a name resolves to a snapshot folder of the cache that `huggingface_hub` keeps
//! (`<cache>/models--openai--clip-vit-base-patch32/snapshots/<commit>/`, the commit read from
//! `refs/<revision>`), exactly as `try_to_load_from_cache` resolves it. A path that exists always wins over
//! a name, as it does for transformers' `from_pretrained`.
//!
//! - A model: `OWNER/NAME[@REVISION]`, the revision a branch or tag (`main` by default), a commit hash, or a
//!   commit's first 7 or more hex digits.
//! - A dataset: `OWNER/NAME[@REVISION][:[CONFIG/]SPLIT]` (split `test` by default), the split's parquet shards
//!   found in the snapshot as the hub lays them out: `data/test-00000-of-00002.parquet` and the rest,
//!   `test.parquet`, or a folder named after the split (`default/test/0000.parquet`, the hub's parquet
//!   conversion). Where several configs' folders have the split (`cropped_digits/` and `full_numbers/`, say),
//!   `CONFIG` names the folder to take it from.
//! - A name without an owner (`mnist`, as older datasets and models were named) is looked up only where the
//!   cache has it, so that a mistyped local path is still reported as one.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

use crate::data::parquet_shards;

/// What a Hub repository holds: its cache folders are `models--…` and `datasets--…`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    fn word(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }
}

/// A model or dataset to open: the path given, or the cache's folder for the name given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// What to open.
    pub path: PathBuf,
    /// For a name found in the cache, one line saying which snapshot it is; `None` for a path.
    pub note: Option<String>,
}

impl Located {
    fn as_given(path: &Path) -> Self {
        Located { path: path.to_path_buf(), note: None }
    }
}

/// A Hugging Face Hub cache, where Hub names are looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubCache {
    dir: Option<PathBuf>,
}

impl HubCache {
    /// The cache `huggingface_hub` uses in this environment ([`cache_dir`]).
    pub fn from_env() -> Self {
        HubCache { dir: cache_dir() }
    }

    /// The cache in folder `dir`.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        HubCache { dir: Some(dir.into()) }
    }

    /// The cache's folder (`None` when the environment names none).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// How many model and dataset repositories the cache holds (`None` when its folder does not exist).
    pub fn holdings(&self) -> Option<(usize, usize)> {
        let names = sorted_names(self.dir.as_deref().filter(|d| d.is_dir())?, |p| p.is_dir());
        let count = |kind: RepoKind| names.iter().filter(|n| n.starts_with(&format!("{}s--", kind.word()))).count();
        Some((count(RepoKind::Model), count(RepoKind::Dataset)))
    }

    /// The model `spec` names: the path itself when it exists or is no Hub name, else the cached snapshot.
    pub fn locate_model(&self, spec: &Path) -> Result<Located> {
        self.locate(spec, RepoKind::Model)
    }

    /// The dataset `spec` names: the path itself when it exists (a file, a folder, or a parquet split's
    /// prefix such as `data/test`) or is no Hub name, else the split's shards in the cached snapshot.
    pub fn locate_data(&self, spec: &Path) -> Result<Located> {
        if spec.exists() || parquet_shards(spec).is_some() {
            return Ok(Located::as_given(spec));
        }
        self.locate(spec, RepoKind::Dataset)
    }

    fn locate(&self, spec: &Path, kind: RepoKind) -> Result<Located> {
        if spec.exists() {
            return Ok(Located::as_given(spec));
        }
        let Some(name) = spec.to_str().and_then(|s| HubName::parse(s, kind)) else {
            return Ok(Located::as_given(spec)); // the opener names the missing path
        };
        if !name.repo.contains('/') && !self.dir.as_ref().is_some_and(|c| name.folder(c).is_dir()) {
            return Ok(Located::as_given(spec)); // no owner and not cached: a missing path, most likely
        }
        let Some(cache) = &self.dir else {
            bail!(
                "{}: no such file or folder, and no Hugging Face cache to look for the {} in (set HF_HUB_CACHE \
                 or HOME)",
                spec.display(),
                kind.word()
            )
        };
        name.resolve(cache).map_err(|why| {
            anyhow!(
                "{}: no such file or folder, nor a {} in the Hugging Face cache: {why}",
                spec.display(),
                kind.word()
            )
        })
    }
}

/// `huggingface_hub`'s cache folder: `$HF_HUB_CACHE`, else `$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`,
/// else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (`None` without a home).
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(|name| std::env::var_os(name))
}

/// [`cache_dir`] with the environment's variables read by `env`.
fn cache_dir_from(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let home = env("HOME").filter(|v| !v.is_empty()).map(PathBuf::from);
    let var = |name: &str| env(name).filter(|v| !v.is_empty()).map(|v| expand_home(Path::new(&v), home.as_deref()));
    if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return Some(dir);
    }
    let hf_home = var("HF_HOME")
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface")))
        .or_else(|| home.as_ref().map(|h| h.join(".cache").join("huggingface")))?;
    Some(hf_home.join("hub"))
}

/// `~/…` with the home folder, as Python's `expanduser` reads the variables above.
fn expand_home(path: &Path, home: Option<&Path>) -> PathBuf {
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path.to_path_buf(),
    }
}

/// Extensions of the files the engine reads, which no repository name is taken to end with.
const FILE_EXTENSIONS: [&str; 9] = ["safetensors", "parquet", "json", "txt", "png", "jpg", "jpeg", "bin", "pt"];

/// `[OWNER/]NAME[@REVISION][:[CONFIG/]SPLIT]`, checked as the Hub checks repository ids.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HubName {
    kind: RepoKind,
    repo: String,
    revision: Option<String>,
    /// The split, and the config folder it must lie in.
    split: Option<(Option<String>, String)>,
}

impl HubName {
    /// `None` when `spec` cannot be a Hub name (a path such as `./x`, `/data/x`, `a/b/c` or `x.safetensors`).
    fn parse(spec: &str, kind: RepoKind) -> Option<Self> {
        let (rest, split) = match spec.rsplit_once(':') {
            Some((rest, split)) if kind == RepoKind::Dataset => (rest, Some(split)),
            Some(_) => return None,
            None => (spec, None),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, revision)) => (repo, Some(revision)),
            None => (rest, None),
        };
        let (owner, name) = repo.split_once('/').map_or((None, repo), |(o, n)| (Some(o), n));
        let part = |s: &str| {
            let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            (1..=96).contains(&s.len())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                && edge(s.chars().next())
                && edge(s.chars().last())
                && !s.contains("--")
                && !s.contains("..")
        };
        let revision_ok = |r: &str| {
            !r.is_empty()
                && r.chars().all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c))
                && r.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
        };
        let split = match split.map(|s| s.split_once('/').map_or((None, s), |(c, s)| (Some(c), s))) {
            Some((config, split)) if part(split) && config.is_none_or(part) => {
                Some((config.map(str::to_string), split.to_string()))
            }
            Some(_) => return None,
            None => None,
        };
        // A file's name (`x.safetensors`, `data/test.parquet`; without an owner, any name with a dot) is a
        // path, not a repository.
        let extension = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
        let file_like = (owner.is_none() && extension.is_some())
            || extension.is_some_and(|e| FILE_EXTENSIONS.contains(&e.as_str()));
        if !owner.is_none_or(part) || !part(name) || file_like || !revision.is_none_or(revision_ok) {
            return None;
        }
        Some(HubName { kind, repo: repo.to_string(), revision: revision.map(str::to_string), split })
    }

    /// The repository's folder in `cache`.
    fn folder(&self, cache: &Path) -> PathBuf {
        cache.join(format!("{}s--{}", self.kind.word(), self.repo.replace('/', "--")))
    }

    /// The snapshot folder (a model) or the split's shards (a dataset) in `cache`, or why not.
    fn resolve(&self, cache: &Path) -> Result<Located, String> {
        let folder = self.folder(cache);
        if !folder.is_dir() {
            return Err(format!(
                "{} does not exist (set HF_HUB_CACHE or HF_HOME if the cache is elsewhere)",
                folder.display()
            ));
        }
        let revision = self.revision.as_deref().unwrap_or("main");
        let commit = self.commit(&folder, revision)?;
        let snapshot = folder.join("snapshots").join(&commit);
        let at = if self.revision.is_some() { format!("{}@{revision}", self.repo) } else { self.repo.clone() };
        let short = &commit[..commit.len().min(12)];
        match self.kind {
            RepoKind::Model => Ok(Located {
                note: Some(format!("{at}: the Hugging Face cache's snapshot {short} ({})", snapshot.display())),
                path: snapshot,
            }),
            RepoKind::Dataset => {
                let (config, split) = match &self.split {
                    Some((config, split)) => (config.as_deref(), split.as_str()),
                    None => (None, "test"),
                };
                let path = split_in(&snapshot, config, split).map_err(|e| e.replace("{name}", &at))?;
                Ok(Located {
                    note: Some(format!(
                        "{at}: split {split} of the Hugging Face cache's snapshot {short} ({})",
                        path.display()
                    )),
                    path,
                })
            }
        }
    }

    /// The commit `revision` names in a repository's cache folder: a ref's, a snapshot's own name, or the
    /// one snapshot whose name starts with it (7 or more hex digits).
    fn commit(&self, folder: &Path, revision: &str) -> Result<String, String> {
        let snapshots = sorted_names(&folder.join("snapshots"), |p| p.is_dir());
        let refs = refs_of(&folder.join("refs"));
        let commit = match std::fs::read_to_string(folder.join("refs").join(revision)) {
            Ok(commit) => commit.trim().to_string(),
            Err(_) => revision.to_string(),
        };
        if snapshots.contains(&commit) {
            return Ok(commit);
        }
        let hex = commit.len() >= 7 && commit.bytes().all(|b| b.is_ascii_hexdigit());
        let starting: Vec<&String> = snapshots.iter().filter(|s| hex && s.starts_with(&commit)).collect();
        if let [one] = starting.as_slice() {
            return Ok(one.to_string());
        }
        let listed = |names: Vec<&str>| if names.is_empty() { "none".to_string() } else { names.join(", ") };
        let what =
            if commit == revision { format!("revision {revision}") } else { format!("{revision} (commit {commit})") };
        let short: Vec<&str> = snapshots.iter().map(|s| &s[..s.len().min(12)]).collect();
        let why = if starting.len() > 1 { "names several snapshots" } else { "is not in the cache" };
        Err(format!(
            "{what} of {} {why} (refs: {}; snapshots: {})",
            self.repo,
            listed(refs.iter().map(String::as_str).collect()),
            listed(short)
        ))
    }
}

/// The names in `dir` whose paths pass `keep`, sorted.
fn sorted_names(dir: &Path, keep: impl Fn(&Path) -> bool) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| keep(&e.path()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// The refs a repository's cache folder holds (`main`, `refs/pr/1`), sorted.
fn refs_of(dir: &Path) -> Vec<String> {
    let mut refs = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for name in sorted_names(&d, |_| true) {
            let path = d.join(&name);
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                refs.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    refs.sort();
    refs
}

/// How deep under a snapshot a split's shards may lie (`<config>/<split>/0000.parquet` is 3).
const SPLIT_DEPTH: usize = 4;

/// The one place in a dataset snapshot holding split `split`'s parquet shards (under a folder named `config`
/// when given), as [`parquet_shards`] reads it: the prefix `dir/split` of `split-00000-of-00002.parquet` and
/// the rest, a file `split.parquet`, or a folder named `split` holding shards. An error's `{name}` stands for
/// the dataset's name.
fn split_in(snapshot: &Path, config: Option<&str>, split: &str) -> Result<PathBuf, String> {
    let mut files = Vec::new();
    parquet_under(snapshot, SPLIT_DEPTH, &mut files);
    if files.is_empty() {
        return Err(format!(
            "{} holds no parquet files (the engine reads datasets stored as parquet, as FusionBench's are)",
            snapshot.display()
        ));
    }
    let mut places: Vec<PathBuf> = Vec::new();
    let mut splits: Vec<String> = Vec::new();
    for file in &files {
        let dir = file.parent().unwrap_or(snapshot);
        let stem = file.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let numbered = !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit());
        let (name, place) = match crate::data::split_of(file) {
            Some(s) => {
                let prefix = dir.join(&s);
                (s, prefix)
            }
            // `default/test/0000.parquet`: the hub's parquet conversion names the folder after the split.
            None if numbered && dir != snapshot => {
                (dir.file_name().unwrap_or_default().to_string_lossy().into_owned(), dir.to_path_buf())
            }
            None => (stem, file.clone()),
        };
        let within = place.strip_prefix(snapshot).unwrap_or(&place);
        let in_config = config.is_none_or(|c| within.parent().is_some_and(|p| p.iter().any(|f| f == c)));
        if name == split && in_config && !places.contains(&place) {
            places.push(place);
        }
        if !splits.contains(&name) {
            splits.push(name);
        }
    }
    let relative = |p: &Path| p.strip_prefix(snapshot).unwrap_or(p).display().to_string();
    match places.as_slice() {
        [one] => Ok(one.clone()),
        [] => {
            splits.sort();
            let wanted = config.map_or(split.to_string(), |c| format!("{c}/{split}"));
            Err(format!("no parquet split {wanted} in {} (splits: {})", snapshot.display(), splits.join(", ")))
        }
        many => {
            let mut names: Vec<String> = many.iter().map(|p| relative(p)).collect();
            names.sort();
            Err(format!(
                "split {split} is in {} places of {} ({}): name one as {{name}}:{}",
                many.len(),
                snapshot.display(),
                names.join(", "),
                names[0]
            ))
        }
    }
}

/// Every `.parquet` file under `dir`, `depth` folders deep at most.
fn parquet_under(dir: &Path, depth: usize, files: &mut Vec<PathBuf>) {
    for name in sorted_names(dir, |_| true) {
        let path = dir.join(name);
        if path.is_dir() {
            if depth > 1 {
                parquet_under(&path, depth - 1, files);
            }
        } else if crate::data::is_parquet_file(&path) && (path.is_file() || is_dangling(&path)) {
            files.push(path);
        }
    }
}

/// True when `path` is a link to nothing.
pub(crate) fn is_dangling(path: &Path) -> bool {
    path.is_symlink() && !path.exists()
}

/// Fails when `path` is a link to nothing: in the Hugging Face cache, a file whose download did not finish (the
/// snapshot links to a blob that is not there). `exists()` alone would say the file is missing, and a listing
/// that keeps files only would leave it out silently.
pub(crate) fn check_not_dangling(path: &Path) -> Result<()> {
    if is_dangling(path) {
        let target = std::fs::read_link(path).unwrap_or_default();
        bail!(
            "{}: a link to {}, which does not exist (in the Hugging Face cache: a download that did not finish; \
             fetch it again)",
            path.display(),
            target.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Split = Option<(Option<String>, String)>;

    fn name(spec: &str, kind: RepoKind) -> Option<(String, Option<String>, Split)> {
        HubName::parse(spec, kind).map(|n| (n.repo, n.revision, n.split))
    }

    #[test]
    fn hub_names_are_told_from_paths() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            name("openai/clip-vit-base-patch32", RepoKind::Model),
            Some(("openai/clip-vit-base-patch32".into(), None, None))
        );
        assert_eq!(name("a_b/c.d@v1.0", RepoKind::Model), Some(("a_b/c.d".into(), s("v1.0"), None)));
        assert_eq!(name("o/n@refs/pr/3", RepoKind::Model), Some(("o/n".into(), s("refs/pr/3"), None)));
        assert_eq!(
            name("tanganke/sun397:test", RepoKind::Dataset),
            Some(("tanganke/sun397".into(), None, Some((None, "test".into()))))
        );
        assert_eq!(
            name("o/n@refs/convert/parquet:train", RepoKind::Dataset),
            Some(("o/n".into(), s("refs/convert/parquet"), Some((None, "train".into()))))
        );
        for path in [
            "./o/n", "/o/n", "o/n/c", "o/", "/n", "o/n.", "o/-n", "o/a--b", "o/a..b", "o/n@", "o/n@../x", "~/n",
            "x.json",
        ] {
            assert_eq!(name(path, RepoKind::Model), None, "{path}");
        }
        assert_eq!(name("o/n:test", RepoKind::Model), None, "a model has no split");
        assert_eq!(name("o/n:", RepoKind::Dataset), None);
        assert_eq!(
            name("ufldl-stanford/svhn:cropped_digits/test", RepoKind::Dataset),
            Some(("ufldl-stanford/svhn".into(), None, Some((s("cropped_digits"), "test".into()))))
        );
        assert_eq!(name("o/n:a/b/c", RepoKind::Dataset), None);
        assert_eq!(name("mnist:train", RepoKind::Dataset), Some(("mnist".into(), None, Some((None, "train".into())))));
        assert_eq!(name("gpt2@main", RepoKind::Model), Some(("gpt2".into(), s("main"), None)));
        assert_eq!(name("pixels.safetensors", RepoKind::Dataset), None, "a file name");
        assert_eq!(name("data/pixels.safetensors", RepoKind::Dataset), None, "a file's path");
        assert_eq!(name("meta-llama/Llama-3.1-8B", RepoKind::Model).map(|n| n.0), s("meta-llama/Llama-3.1-8B"));
    }

    #[test]
    fn the_cache_folder_follows_huggingface_hubs_variables() {
        let with = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            cache_dir_from(move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.into()))
        };
        let all = [
            ("HF_HUB_CACHE", "/a"),
            ("HUGGINGFACE_HUB_CACHE", "/b"),
            ("HF_HOME", "/c"),
            ("XDG_CACHE_HOME", "/d"),
            ("HOME", "/e"),
        ];
        let expected = ["/a", "/b", "/c/hub", "/d/huggingface/hub", "/e/.cache/huggingface/hub"];
        for (i, want) in expected.iter().enumerate() {
            assert_eq!(with(&all[i..]), Some(PathBuf::from(want)), "from {}", all[i].0);
        }
        assert_eq!(with(&[]), None);
        assert_eq!(with(&[("HF_HUB_CACHE", ""), ("HOME", "/e")]), Some(PathBuf::from("/e/.cache/huggingface/hub")));
        assert_eq!(with(&[("HF_HOME", "~/hf"), ("HOME", "/e")]), Some(PathBuf::from("/e/hf/hub")));
    }

    /// A dataset snapshot holding empty files at `names`, and a cache around it reached by `main`.
    fn snapshot(names: &[&str]) -> (tempfile::TempDir, PathBuf) {
        snapshot_of("datasets--o--n", names)
    }

    /// [`snapshot`] of the repository whose cache folder is `folder`.
    fn snapshot_of(folder: &str, names: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join(folder);
        let snap = repo.join("snapshots").join("0123456789abcdef0123456789abcdef01234567");
        for name in names {
            let path = snap.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"").unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123456789abcdef0123456789abcdef01234567").unwrap();
        (cache, snap)
    }

    #[test]
    fn a_split_is_found_in_each_of_the_hubs_layouts() {
        let locate = |cache: &tempfile::TempDir, spec: &str| {
            HubCache::at(cache.path()).locate_data(Path::new(spec)).map(|l| l.path).map_err(|e| format!("{e:#}"))
        };
        let (cache, snap) =
            snapshot(&["data/test-00000-of-00002.parquet", "data/test-00001-of-00002.parquet", "README.md"]);
        assert_eq!(locate(&cache, "o/n").unwrap(), snap.join("data/test"));
        let (cache, snap) = snapshot(&["default/test/0000.parquet", "default/train/0000.parquet"]);
        assert_eq!(locate(&cache, "o/n:train").unwrap(), snap.join("default/train"));
        let (cache, snap) = snapshot(&["test.parquet", "validation.parquet"]);
        assert_eq!(locate(&cache, "o/n:validation").unwrap(), snap.join("validation.parquet"));
        let err = locate(&cache, "o/n:train").unwrap_err();
        assert!(err.contains("no parquet split train") && err.contains("(splits: test, validation)"), "{err}");
        let (cache, _) = snapshot(&["a/test/0000.parquet", "b/test-00000-of-00001.parquet"]);
        let err = locate(&cache, "o/n").unwrap_err();
        assert!(err.contains("split test is in 2 places") && err.contains("(a/test, b/test)"), "{err}");
        let (cache, snap) =
            snapshot(&["cropped_digits/test-00000-of-00001.parquet", "full_numbers/test-00000-of-00001.parquet"]);
        let err = locate(&cache, "o/n").unwrap_err();
        assert!(err.contains("(cropped_digits/test, full_numbers/test): name one as o/n:cropped_digits/test"), "{err}");
        assert_eq!(locate(&cache, "o/n:full_numbers/test").unwrap(), snap.join("full_numbers/test"));
        let err = locate(&cache, "o/n@main:extra/test").unwrap_err();
        assert!(err.contains("no parquet split extra/test"), "{err}");
        let (cache, _) = snapshot(&["data/test.arrow"]);
        let err = locate(&cache, "o/n").unwrap_err();
        assert!(err.contains("holds no parquet files"), "{err}");
    }

    #[test]
    fn a_name_without_an_owner_is_looked_up_only_where_cached() {
        let (cache, snap) = snapshot_of("datasets--mnist", &["mnist/test-00000-of-00001.parquet"]);
        let hub = HubCache::at(cache.path());
        assert_eq!(hub.locate_data(Path::new("mnist")).unwrap().path, snap.join("mnist/test"));
        let absent = hub.locate_data(Path::new("cifar10")).unwrap();
        assert_eq!((absent.path, absent.note), (PathBuf::from("cifar10"), None), "left for the opener to refuse");
        let absent = hub.locate_model(Path::new("mnist")).unwrap();
        assert_eq!(absent.path, PathBuf::from("mnist"), "a dataset's folder is not a model's");
    }

    #[test]
    fn revisions_are_refs_commits_or_a_commits_first_digits() {
        let (cache, snap) = snapshot(&["test.parquet"]);
        let repo = cache.path().join("datasets--o--n");
        let other = repo.join("snapshots/0123456fffffffffffffffffffffffffffffffff");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("test.parquet"), b"").unwrap();
        std::fs::create_dir_all(repo.join("refs/refs/pr")).unwrap();
        std::fs::write(repo.join("refs/refs/pr/1"), "0123456fffffffffffffffffffffffffffffffff\n").unwrap();
        let locate = |spec: &str| HubCache::at(cache.path()).locate_data(Path::new(spec)).map(|l| l.path);
        assert_eq!(locate("o/n@main").unwrap(), snap.join("test.parquet"));
        assert_eq!(
            locate("o/n@refs/pr/1").unwrap(),
            other.join("test.parquet"),
            "a ref's trailing newline is not its name"
        );
        assert_eq!(locate("o/n@0123456789ab").unwrap(), snap.join("test.parquet"));
        let err = format!("{:#}", locate("o/n@0123456").unwrap_err());
        assert!(err.contains("names several snapshots"), "{err}");
        let err = format!("{:#}", locate("o/n@v2").unwrap_err());
        assert!(err.contains("refs: main, refs/pr/1; snapshots: 0123456789ab, 0123456fffff"), "{err}");
        let err = format!("{:#}", HubCache::at(cache.path()).locate_model(Path::new("o/n")).unwrap_err());
        assert!(
            err.contains("nor a model in the Hugging Face cache") && err.contains("models--o--n does not exist"),
            "{err}"
        );
    }
}
