//! Malformed input never panics the parser: a handful of nasty texts, each either accepted
//! or refused with errors that carry a message. (The fuzz target covers the rest.)

use membrane_policy::parse_policies;

#[test]
fn malformed_yaml_never_panics() {
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let deep_block = (0..3000)
        .map(|i| format!("{}- a\n", " ".repeat(i)))
        .collect::<String>();
    let laughs = "a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]\n";
    let inputs: Vec<String> = vec![
        "\0".into(),
        "\u{feff}\u{feff}".into(),
        ":".into(),
        "- - - -".into(),
        "{{{{".into(),
        "a: b: c".into(),
        "&a *a".into(),
        "*undefined".into(),
        "!!binary zzz".into(),
        "!<tag:x> {kind: AuthorizationPolicy}".into(),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{to: [{operation: {ports: [18446744073709551616, -9223372036854775809, 1e400]}}]}]}\n".into(),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{from: [{source: {principals: [\"\u{1F600}*\", \"*\u{0}\", \"spiffe://\"]}}]}]}\n".into(),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{from: [{source: {ipBlocks: [\"1.2.3.4/\u{661}\", \"::ffff:1.2.3.4/129\"]}}]}]}\n".into(),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{when: [{key: \"request.headers[\", values: [\"\"]}]}]}\n".into(),
        "kind: List\napiVersion: v1\nitems: 5\n".into(),
        "kind: List\napiVersion: v1\nitems: [1, null, {kind: AuthorizationPolicy}]\n".into(),
        "a: 1\na: 2\n".into(),
        "<<: *x\n".into(),
        "--- |\n  text\n--- 5\n--- [1]\n".into(),
        deep,
        deep_block,
        laughs.into(),
    ];
    for input in &inputs {
        // Whatever the outcome, no panic and errors carry a message.
        if let Err(errs) = parse_policies(input) {
            assert!(!errs.is_empty());
            assert!(errs.iter().all(|e| !e.to_string().is_empty()));
        }
    }
}
