fn main() {
    println!("lb-agent {}", env!("CARGO_PKG_VERSION"));
}
