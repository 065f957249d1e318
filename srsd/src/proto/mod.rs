//! The two Postfix lookup-table protocols srsd answers: tcp_table (postsrsd 1.x) and socketmap
//! (postsrsd 2.x). Pure codecs: bytes in, values out, every frame capped.

pub mod socketmap;
pub mod tcp_table;
