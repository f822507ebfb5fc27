//! The bundled multi-task suite (`assets/suite`, made by `tools/build_suite.py`): a pretrained model, one
//! fine-tuned expert per task, the heads and each task's labelled test split, described by `suite.json`.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

/// One task of the suite.
#[derive(Clone, Debug, Deserialize)]
pub struct SuiteTask {
    /// The task's name: its head is `head.<name>`, its expert `experts/<name>`, its data `data/<name>.safetensors`.
    pub name: String,
    /// Class names, in label order.
    pub classes: Vec<String>,
    /// Where the images come from.
    pub source: String,
    /// Their licence.
    pub licence: String,
}

#[derive(Deserialize)]
struct Manifest {
    tasks: Vec<SuiteTask>,
}

/// A suite directory, checked to hold every file its manifest names.
#[derive(Clone, Debug)]
pub struct Suite {
    /// The suite's directory.
    pub root: PathBuf,
    /// Its tasks, in order (the experts' order in merges).
    pub tasks: Vec<SuiteTask>,
}

impl Suite {
    /// The suite bundled with the source tree: `$WEMOE_SUITE` when set, else `assets/suite` of this crate.
    pub fn bundled_path() -> PathBuf {
        match std::env::var_os("WEMOE_SUITE") {
            Some(p) => PathBuf::from(p),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("assets").join("suite"),
        }
    }

    /// Opens the suite in `root`, checking that every model, the heads and every task's data exist.
    pub fn open(root: &Path) -> Result<Self> {
        let manifest = root.join("suite.json");
        let text = std::fs::read_to_string(&manifest).with_context(|| {
            format!("{}: cannot read the suite's manifest (build it with tools/build_suite.py)", manifest.display())
        })?;
        let parsed: Manifest =
            serde_json::from_str(&text).with_context(|| format!("{}: not a suite manifest", manifest.display()))?;
        ensure!(!parsed.tasks.is_empty(), "{}: lists no tasks", manifest.display());
        let suite = Suite { root: root.to_path_buf(), tasks: parsed.tasks };
        let mut seen = std::collections::BTreeSet::new();
        for task in &suite.tasks {
            if !seen.insert(&task.name) {
                bail!("{}: task '{}' is listed twice", manifest.display(), task.name);
            }
            for path in [suite.expert(&task.name), suite.data(&task.name)] {
                ensure!(path.exists(), "{}: missing (task '{}' of the suite)", path.display(), task.name);
            }
        }
        for path in [suite.pretrained(), suite.heads()] {
            ensure!(path.exists(), "{}: missing from the suite", path.display());
        }
        Ok(suite)
    }

    /// The pretrained model's directory.
    pub fn pretrained(&self) -> PathBuf {
        self.root.join("pretrained")
    }

    /// The heads file.
    pub fn heads(&self) -> PathBuf {
        self.root.join("heads.safetensors")
    }

    /// The expert fine-tuned on `task`.
    pub fn expert(&self, task: &str) -> PathBuf {
        self.root.join("experts").join(task)
    }

    /// The labelled test split of `task`.
    pub fn data(&self, task: &str) -> PathBuf {
        self.root.join("data").join(format!("{task}.safetensors"))
    }

    /// The task names, in order.
    pub fn task_names(&self) -> Vec<String> {
        self.tasks.iter().map(|t| t.name.clone()).collect()
    }
}
