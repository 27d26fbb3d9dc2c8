//! Checks the job file's nesting pre-scan against libyaml itself: the flow depth the pre-scan
//! reports must be at least the depth libyaml's scanner reaches (it may never miss a bracket
//! that libyaml counts, or a deep file would reach libyaml's quadratic scan), and exactly that
//! depth when libyaml scans the whole text without an error (no false refusals).

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::mem::MaybeUninit;
use unsafe_libyaml::{
    YAML_FLOW_MAPPING_END_TOKEN, YAML_FLOW_MAPPING_START_TOKEN, YAML_FLOW_SEQUENCE_END_TOKEN,
    YAML_FLOW_SEQUENCE_START_TOKEN, YAML_STREAM_END_TOKEN, yaml_parser_delete,
    yaml_parser_initialize, yaml_parser_scan, yaml_parser_set_input_string, yaml_parser_t,
    yaml_token_delete, yaml_token_t,
};

/// The greatest flow depth libyaml's scanner reaches, and whether it scanned to the end.
fn libyaml_depth(text: &[u8]) -> (usize, bool) {
    // SAFETY: the parser is initialised before use and deleted once; each token is deleted
    // after its type is read; `text` outlives the parser.
    unsafe {
        let mut parser = MaybeUninit::<yaml_parser_t>::uninit();
        assert!(yaml_parser_initialize(parser.as_mut_ptr()).ok, "parser initialised");
        let parser = parser.as_mut_ptr();
        yaml_parser_set_input_string(parser, text.as_ptr(), text.len() as _);
        let (mut depth, mut deepest) = (0_usize, 0_usize);
        let complete = loop {
            let mut token = MaybeUninit::<yaml_token_t>::uninit();
            if !yaml_parser_scan(parser, token.as_mut_ptr()).ok {
                break false;
            }
            let token = token.as_mut_ptr();
            let kind = (*token).type_;
            yaml_token_delete(token);
            match kind {
                YAML_FLOW_SEQUENCE_START_TOKEN | YAML_FLOW_MAPPING_START_TOKEN => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                YAML_FLOW_SEQUENCE_END_TOKEN | YAML_FLOW_MAPPING_END_TOKEN => {
                    depth = depth.saturating_sub(1);
                }
                YAML_STREAM_END_TOKEN => break true,
                _ => {}
            }
        };
        yaml_parser_delete(parser);
        (deepest, complete)
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let ours = krea_batch::flow_depth(text);
    let (theirs, complete) = libyaml_depth(data);
    assert!(ours >= theirs, "the pre-scan saw depth {ours}, libyaml {theirs}: {text:?}");
    if complete {
        assert_eq!(ours, theirs, "the pre-scan over-counts a text libyaml accepts: {text:?}");
    }
});
