//! The `fairlead-cni` executable: environment and stdin in, CNI JSON out.

use std::{
    io::{Read, Write},
    process::ExitCode,
};

use anyhow::Context;

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fairlead-cni: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let outcome = fairlead_cni::run(
        |var| std::env::var(var).ok(),
        || {
            let mut stdin = Vec::new();
            std::io::stdin().read_to_end(&mut stdin)?;
            Ok(stdin)
        },
    );
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(outcome.stdout.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing the CNI result to stdout")?;
    Ok(ExitCode::from(outcome.exit_code))
}
