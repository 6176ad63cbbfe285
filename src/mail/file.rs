//! The file transport: each message becomes `<dir>/<mail_id>.eml`, for development
//! and for hosts that hand mail to another program by directory.

use std::path::Path;

/// Writes one message; the rename makes it appear whole or not at all.
pub async fn write_eml(dir: &Path, name: &str, raw: &[u8]) -> std::io::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    let tmp = dir.join(format!(".{name}.eml.tmp"));
    tokio::fs::write(&tmp, raw).await?;
    tokio::fs::rename(&tmp, dir.join(format!("{name}.eml"))).await
}
