//! How `membrane demo` tells its story: numbered steps and their outcomes, as text for a
//! terminal or as JSON lines for a program. It owns only the output format; the demo and the
//! data-plane tour decide what to say.

use serde_json::json;

/// Prints steps as text or as JSON lines.
pub struct Narrator {
    json: bool,
    step: usize,
}

impl Narrator {
    /// A narrator printing text, or JSON lines when `json`.
    pub fn new(json: bool) -> Self {
        Self { json, step: 0 }
    }

    /// Starts a numbered step.
    pub fn step(&mut self, title: &str) {
        self.step += 1;
        if !self.json {
            println!("\n[{}] {title}", self.step);
        }
    }

    /// Reports one outcome of the current step.
    pub fn say(&self, ok: bool, text: &str, detail: serde_json::Value) {
        if self.json {
            println!(
                "{}",
                json!({"step": self.step, "ok": ok, "message": text, "detail": detail})
            );
        } else {
            let mark = if ok { "  ✔" } else { "  ✘" };
            println!("{mark} {text}");
            if let serde_json::Value::Object(map) = &detail {
                for (k, v) in map {
                    let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    println!("      {k}: {v}");
                }
            }
        }
    }
}
