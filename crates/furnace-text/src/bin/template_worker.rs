//! A chat-template render worker (`furnace_text::sandbox`), for programs that embed
//! furnace-text without serving workers from their own executable, and for its tests.

fn main() {
    std::process::exit(furnace_text::sandbox::serve_worker());
}
