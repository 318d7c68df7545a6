//! What `convert` does around the copy: opening the sources, the target's
//! creation options (`-o`, `-B`/`-F`, `-c`), creating or opening the
//! target, the image its unallocated clusters read from, and the
//! persistent bitmaps (`--bitmaps`).

use std::path::Path;
use std::sync::Arc;

use oxqcow::qemu_syntax::split_options;
use oxqcow::{BlockDevice, CacheMode, CreateOptions, Image, ImageFormat, OpenOptions, Preallocation};

use super::args::Args;
use crate::app::ctx::Ctx;
use crate::app::forbid_backing::backing_forbidden;
use crate::app::image::{is_cache_mode, open_image, open_image_as, open_operand, parse_image_opts};
use crate::app::imgopts::ImgOpts;
use crate::app::messages::{describe, os_error, strerror};
use crate::app::object::{object_name, NewObject};

/// Opens the sources (on their `-l` snapshot, in the `-T` cache mode), and
/// the size of them all.
pub fn open_sources(a: &Args) -> Result<(Vec<Image>, u64), String> {
    let mut sources = Vec::with_capacity(a.sources.len());
    let mut total = 0u64;
    for name in &a.sources {
        let (image, _) = open_operand(name, a.image_opts, a.src_fmt.as_deref(), true, a.force_share)?;
        let image = match &a.snapshot {
            Some(p) => p.load(image, name, a.src_fmt.as_deref())?,
            None => image,
        };
        image
            .set_cache_mode(CacheMode::from_name(&a.src_cache).map_err(|e| describe(&e))?)
            .map_err(|e| format!("Could not open '{name}': {}", describe(&e)))?;
        total = total.checked_add(image.len()).ok_or("the sources are too large together")?;
        sources.push(image);
    }
    Ok((sources, total))
}

/// qemu-img's `convert_check_bitmaps`: one qcow2 (v3) source whose
/// bitmaps are all consistent, unless broken ones are to be skipped.
pub fn check_source_bitmaps(sources: &[Image], skip_broken: bool) -> Result<(), String> {
    if sources.len() > 1 {
        return Err("Copying bitmaps only possible with single source".into());
    }
    let Some(q) = sources[0].as_qcow2().filter(|q| q.header().version >= 3) else {
        return Err("Source lacks bitmap support".into());
    };
    if skip_broken {
        return Ok(());
    }
    // QEMU walks its bitmap list, newest (last loaded) first.
    match q.bitmaps().iter().rev().find(|b| b.in_use) {
        Some(b) => Err(format!(
            "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
            b.name
        )),
        None => Ok(()),
    }
}

/// The target's creation options for `total` bytes in format `out_fmt`:
/// `-o`, then `-B`/`-F` (the backing file it will have), checked with
/// `-c` as qemu-img checks them.
pub fn create_options(
    a: &Args,
    out_fmt: &str,
    total: u64,
) -> Result<(ImageFormat, CreateOptions, Option<TargetBacking>), String> {
    let format = ImageFormat::from_name(out_fmt).map_err(|_| format!("Unknown file format '{out_fmt}'"))?;
    let mut opts = match format {
        ImageFormat::Qcow2 | ImageFormat::Qcow => CreateOptions { format, ..CreateOptions::qcow2(total) },
        ImageFormat::Raw => CreateOptions::raw(total),
        // luks's options are all its own: read as create reads them.
        ImageFormat::Luks => {
            let mut io = ImgOpts::new(format);
            if let Some(o) = &a.options {
                io.parse(o)?;
            }
            io.set_number("size", total);
            io.to_create_options()?
        }
    };
    if let Some(o) = a.options.as_ref().filter(|_| format != ImageFormat::Luks) {
        // The encryption options are read as create reads them (secrets by
        // id, QEMU's messages); the rest are the library's.
        let (enc, rest): (Vec<_>, Vec<_>) =
            split_options(o).into_iter().partition(|(k, _)| k == "encryption" || k.starts_with("encrypt."));
        if format == ImageFormat::Qcow2 && !enc.is_empty() {
            let mut io = ImgOpts::new(format);
            for (k, v) in &enc {
                io.set(k, v)?;
            }
            opts.encryption = io.encryption()?;
        }
        let o = if format == ImageFormat::Qcow2 {
            rest.iter().map(|(k, v)| format!("{k}={}", v.replace(',', ",,"))).collect::<Vec<_>>().join(",")
        } else {
            o.clone()
        };
        opts.apply_option_string(&o).map_err(|e| {
            let msg = describe(&e);
            // qcow2 itself checks the compression type, when creating.
            if msg.starts_with("Parameter 'compression-type'") {
                format!("{}: error while converting {out_fmt}: {msg}", a.target)
            } else {
                msg
            }
        })?;
    }
    opts.size = total;
    opts.size_given = true;
    let backing = if a.skip_create && a.backing.is_none() { None } else { target_backing(a, &mut opts, format)? };
    if a.compress {
        if format != ImageFormat::Qcow2 {
            return Err("Compression not supported for this file format".into());
        }
        if opts.encryption.is_some() {
            return Err("Compression and encryption not supported at the same time".into());
        }
        if opts.preallocation != Preallocation::Off {
            return Err("Compression and preallocation not supported at the same time".into());
        }
    }
    Ok((format, opts, backing))
}

/// What the target's backing file is, for `-B`.
pub struct TargetBacking {
    /// The name recorded in the target's header.
    pub name: String,
    /// Its format (`-F`); without it an existing target's (`-n`) is probed.
    pub format: Option<String>,
}

/// The target's backing file from `-B`/`-F` and `-o backing_file`/`backing_fmt`,
/// checked as qemu-img checks them.
fn target_backing(a: &Args, opts: &mut CreateOptions, format: ImageFormat) -> Result<Option<TargetBacking>, String> {
    if let Some(b) = &a.backing {
        if format != ImageFormat::Qcow2 {
            return Err(format!("Backing file not supported for file format '{}'", format.name()));
        }
        opts.backing_file = Some(b.clone());
    }
    if let Some(f) = &a.backing_fmt {
        if format == ImageFormat::Qcow2 {
            opts.backing_format = Some(f.clone());
        }
    }
    let Some(name) = opts.backing_file.clone() else {
        if opts.backing_format.is_some() || (a.backing_fmt.is_some() && !a.skip_create) {
            return Err(format!(
                "{}: error while converting {}: Backing format cannot be used without backing file",
                a.target,
                format.name()
            ));
        }
        return Ok(None);
    };
    let Some(fmt) = opts.backing_format.clone() else {
        // The rule is creation's: with -n nothing is created, so qemu-img
        // does not ask for the format.
        if a.skip_create {
            return Ok(Some(TargetBacking { name, format: None }));
        }
        return Err("Use of backing file requires explicit backing format".into());
    };
    if ImageFormat::from_name(&fmt).is_err() {
        return Err(format!(
            "{}: error while converting {}: Unknown backing file format '{fmt}'",
            a.target,
            format.name()
        ));
    }
    if backing_forbidden() {
        return Err(format!(
            "'{}' would have a backing file ('{name}') and opening backing files is forbidden",
            a.target
        ));
    }
    Ok(Some(TargetBacking { name, format: Some(fmt) }))
}

/// Creates the target (unless `-n`) and opens it: with a backing file it
/// is reopened so that the backing file is opened too; `-n` opens the
/// existing one, from `--target-image-opts` or in `out_fmt`. A new object
/// in an object store is made on the returned [`NewObject`]'s storage,
/// which uploads it while it is written.
pub fn target(
    a: &Args,
    out_fmt: &str,
    opts: &mut CreateOptions,
    has_backing: bool,
) -> Result<(Image, Option<NewObject>), String> {
    if !a.skip_create && object_name(&a.target).is_some() {
        return object_target(a, out_fmt, opts, has_backing);
    }
    let created = if a.skip_create {
        None
    } else {
        // Like qemu-img, create without looking at the backing file; opening
        // the new image below reports a backing file that cannot be opened.
        opts.unsafe_backing = true;
        if let Some(refusal) = crate::app::http::no_creation(&a.target) {
            return Err(refusal);
        }
        let image = if crate::app::rbd::is_rbd_name(&a.target) {
            crate::app::rbd::create_rbd_name(&a.target)
                .and_then(|storage| Image::create_storage(storage, opts).map_err(|e| describe(&e)))
                .map_err(|why| format!("{}: error while converting {out_fmt}: {why}", a.target))
        } else {
            Image::create(Path::new(&a.target), opts).map_err(|e| {
                let why = match &e {
                    oxqcow::Error::Io { op: "creating the image", source, .. } => {
                        format!("Could not create '{}': {}", a.target, os_error(source))
                    }
                    other => describe(other),
                };
                format!("{}: error while converting {out_fmt}: {why}", a.target)
            })
        }?;
        if has_backing {
            crate::app::image::close_image(image)
                .map_err(|e| format!("error while closing the target: {}", strerror(&e)))?;
            None
        } else {
            Some(image)
        }
    };
    if !is_cache_mode(&a.cache) {
        return Err(format!("Invalid cache option: {}", a.cache));
    }
    Ok((
        match created {
            Some(t) => t,
            // Like qemu-img, which opens the target with unmap allowed: clusters
            // freed by zeroing give their space back to the host.
            None if a.target_image_opts => {
                if a.out_fmt.is_some() {
                    return Err("--image-opts and --format are mutually exclusive".into());
                }
                let (path, fmt, mut opts) = parse_image_opts(&a.target)?;
                opts.discard_passthrough = true;
                open_image_as(&path, &a.target, fmt.as_deref(), opts)?
            }
            None => {
                let mut opts = OpenOptions::new();
                opts.discard_passthrough = true;
                open_image(&a.target, Some(out_fmt), opts)?
            }
        },
        None,
    ))
}

/// [`target`] for a new object: the upload is started first (a wrong
/// endpoint, bucket or credentials fail before any copying), the image
/// made on the object. What would make the image name other files (a
/// backing file, an external data file) is refused: the object could not
/// find them again.
fn object_target(
    a: &Args,
    out_fmt: &str,
    opts: &mut CreateOptions,
    has_backing: bool,
) -> Result<(Image, Option<NewObject>), String> {
    let fail = |why: &str| format!("{}: error while converting {out_fmt}: {why}", a.target);
    if has_backing {
        return Err(fail("a new object cannot have a backing file"));
    }
    if opts.data_file.is_some() {
        return Err(fail("a new object cannot have an external data file"));
    }
    if !is_cache_mode(&a.cache) {
        return Err(format!("Invalid cache option: {}", a.cache));
    }
    let object = NewObject::start(&a.target)?.expect("the target names an object");
    let image = Image::create_storage(object.storage(), opts).map_err(|e| fail(&describe(&e)))?;
    Ok((image, Some(object)))
}

/// The image the target's unallocated clusters read from (`-B`): the new
/// target's opened backing file, or with `-n` the `-B` image, which the
/// existing target is trusted to be an overlay of.
pub fn backing_image(a: &Args, target: &Image, backing: Option<&TargetBacking>) -> Result<Option<Arc<Image>>, String> {
    Ok(match backing {
        None => None,
        Some(_) if !a.skip_create => match target.as_qcow2().and_then(|q| q.backing()) {
            Some(image) => Some(image.clone()),
            None => return Err(format!("Could not open '{}': the backing file was not opened", a.target)),
        },
        Some(b) => {
            let shown = crate::app::image::backing_filename(&a.target, &b.name);
            Some(Arc::new(open_image(&shown, b.format.as_deref(), OpenOptions::new().read_only(true))?))
        }
    })
}

/// qemu-img's `convert_copy_bitmaps`: each bitmap is added to the target
/// (same granularity, same enabled state) and filled from the source.
pub fn copy_bitmaps(ctx: &Ctx, source: &Image, target: &Image, skip_broken: bool) -> Result<(), String> {
    let (Some(src), Some(dst)) = (source.as_qcow2(), target.as_qcow2()) else { return Ok(()) };
    for b in src.bitmaps().iter().rev() {
        if b.in_use {
            if skip_broken {
                ctx.error(&format!("warning: Skipping inconsistent bitmap '{}'", b.name));
            }
            continue;
        }
        dst.bitmap_add(&b.name, Some(b.granularity), b.auto)
            .map_err(|e| format!("Failed to create bitmap {}: {}", b.name, describe(&e)))?;
        let filled = src.bitmap_contents(&b.name).and_then(|bits| dst.bitmap_merge(&b.name, &bits));
        if let Err(e) = filled {
            let _ = dst.bitmap_remove(&b.name);
            return Err(format!("Failed to populate bitmap {}: {}", b.name, describe(&e)));
        }
    }
    Ok(())
}
