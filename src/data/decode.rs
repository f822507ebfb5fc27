//! Encoded images to interleaved 8-bit samples, as Pillow decodes them: JPEG by libjpeg-turbo's decoder
//! (Pillow's own), PNG by the `png` crate with Pillow's checks, WebP, BMP, GIF, TIFF and PNM by the `image` crate
//! (lossless formats, and WebP's decoder equal to libwebp's; tests/parity_transformers.rs checks each against
//! Pillow).

/// Decodes an encoded image (its format told by content, not name) to interleaved 8-bit samples:
/// (pixels, height, width, channels), channels 1 to 4 (grey, grey and alpha, RGB, RGBA).
pub fn decode_image(bytes: &[u8]) -> Result<(Vec<u8>, usize, usize, usize), String> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(bytes);
    }
    if bytes.starts_with(PNG_SIGNATURE) {
        return decode_png(bytes);
    }
    let decoded = image::load_from_memory(bytes).map_err(|e| e.to_string())?;
    let (w, h) = (decoded.width() as usize, decoded.height() as usize);
    // The decoder expands palettes, and a tRNS chunk into an alpha channel, as Pillow's convert("RGBA")
    // does; the preprocessing composites alpha onto white.
    use image::DynamicImage as D;
    let (pixels, channels) = match decoded {
        D::ImageLuma8(p) => (p.into_raw(), 1),
        D::ImageLumaA8(p) => (p.into_raw(), 2),
        D::ImageRgb8(p) => (p.into_raw(), 3),
        D::ImageRgba8(p) => (p.into_raw(), 4),
        D::ImageLuma16(p) => (high_bytes(&p), 1),
        D::ImageLumaA16(p) => (high_bytes(&p), 2),
        D::ImageRgb16(p) => (high_bytes(&p), 3),
        D::ImageRgba16(p) => (high_bytes(&p), 4),
        other => return Err(format!("unsupported pixel format {:?}", other.color())),
    };
    Ok((pixels, h, w, channels))
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// The most a decoded PNG may take, the `image` crate's default limit (a small file can declare a huge image).
const PNG_MAX_BYTES: usize = 512 << 20;

/// A PNG as Pillow reads it. Pillow checks the CRC of every chunk before the image data, but not the image
/// data's own CRCs nor its zlib checksum, and needs no IEND once the image is complete: a file damaged only there
/// opens in Pillow (so in FusionBench's loaders), where a strict decoder refuses it. A file cut short in its image
/// data is refused, as Pillow refuses it. Palettes and tRNS are expanded as `image` does (and as Pillow's
/// convert("RGBA")); 16-bit samples are read by their high byte.
fn decode_png(bytes: &[u8]) -> Result<(Vec<u8>, usize, usize, usize), String> {
    let decoder = |bytes, checked: bool| {
        let mut decoder =
            png::Decoder::new_with_limits(std::io::Cursor::new(bytes), png::Limits { bytes: PNG_MAX_BYTES });
        decoder.ignore_checksums(!checked);
        decoder.set_transformations(png::Transformations::EXPAND);
        decoder
    };
    // The header chunks, checked as Pillow checks them: reading the header stops at the image data.
    let header = decoder(bytes, true).read_info().map_err(|e| match e.to_string() {
        // The crate's words name the chunk in a debug form; Pillow says "broken PNG file".
        text if text.starts_with("CRC error") => "broken PNG file: a header chunk fails its CRC".to_string(),
        text => text,
    })?;
    let (width, height) = header.info().size();
    let size = header.output_buffer_size().filter(|&size| size <= PNG_MAX_BYTES).ok_or_else(|| {
        format!("a {width}×{height} image, past the {} MiB that one image may take decoded", PNG_MAX_BYTES >> 20)
    })?;
    let image_data = |bytes| -> Result<_, png::DecodingError> {
        let mut reader = decoder(bytes, false).read_info()?;
        let mut buffer = vec![0; size];
        let frame = reader.next_frame(&mut buffer)?;
        buffer.truncate(frame.buffer_size());
        Ok((buffer, frame))
    };
    let (buffer, frame) = match image_data(bytes) {
        // The image data ends where the next chunk begins; with no IEND there, the decoder runs out of file. Given
        // one, a complete image decodes and one cut short still fails.
        Err(png::DecodingError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            let ended = [bytes, &[0, 0, 0, 0], b"IEND", &[0xAE, 0x42, 0x60, 0x82]].concat();
            image_data(&ended).map_err(|_| e.to_string())?
        }
        decoded => decoded.map_err(|e| e.to_string())?,
    };
    let channels = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err("a palette left unexpanded".into()),
    };
    let pixels = match frame.bit_depth {
        png::BitDepth::Eight => buffer,
        // Big-endian: each sample's high byte comes first.
        png::BitDepth::Sixteen => buffer.chunks_exact(2).map(|sample| sample[0]).collect(),
        depth => return Err(format!("{depth:?}-bit samples left unexpanded")),
    };
    Ok((pixels, frame.height as usize, frame.width as usize, channels))
}

/// 16-bit samples as 8-bit ones the way Pillow reads 16-bit PNGs: the high byte. (Pillow keeps 16-bit grey
/// as mode I;16, which transformers' RGB conversion clips to 255; the high byte keeps the picture.)
fn high_bytes(samples: &[u16]) -> Vec<u8> {
    samples.iter().map(|&v| (v >> 8) as u8).collect()
}

/// A CMYK JPEG's pixel as Pillow reads it: every sample inverted (Pillow assumes Adobe's convention, in which
/// files store them inverted), then each colour `(255 − k) − round(c·(255 − k)/255)`. On the file's own
/// samples c' = 255 − c and k' = 255 − k, that is `k' − round((255 − c')·k'/255)`.
fn cmyk_to_rgb([c, m, y, k]: [u8; 4]) -> [u8; 3] {
    let white = u32::from(k);
    [c, m, y].map(|ink| {
        let ink = 255 - u32::from(ink);
        (white - (ink * white + 127) / 255) as u8
    })
}

/// libjpeg's error manager as mozjpeg's (an error unwinds to [`decode_jpeg`]'s `catch_unwind`), but with running
/// out of data an error too: libjpeg warns, fakes the end of the image and fills the rest grey, where Pillow (so
/// FusionBench's loaders) refuses the file as truncated. Other warnings (stray bytes in corrupt data) pass, as in
/// Pillow.
fn jpeg_errors() -> mozjpeg_sys::jpeg_error_mgr {
    // SAFETY: a zeroed manager (null pointers, no handlers) is what jpeg_std_error fills in.
    let mut errors: mozjpeg_sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    // SAFETY: it only writes libjpeg's defaults into `errors`.
    unsafe { mozjpeg_sys::jpeg_std_error(&mut errors) };
    errors.error_exit = Some(jpeg_failed);
    errors.emit_message = Some(jpeg_message);
    errors
}

/// libjpeg's message for the code in `cinfo`'s error manager, with its parameters.
fn jpeg_message_text(cinfo: &mut mozjpeg_sys::jpeg_common_struct) -> String {
    // JMSG_LENGTH_MAX in libjpeg-turbo: the most format_message writes, terminator included (the binding's type
    // says 80).
    let mut buffer = [0u8; 200];
    // SAFETY: `cinfo.err` is the manager libjpeg is reporting through.
    let Some(format) = unsafe { cinfo.err.as_ref() }.and_then(|e| e.format_message) else {
        return "libjpeg failed".into();
    };
    type Bound = unsafe extern "C-unwind" fn(&mut mozjpeg_sys::jpeg_common_struct, &[u8; 80]);
    type Format = unsafe extern "C-unwind" fn(&mut mozjpeg_sys::jpeg_common_struct, *mut u8);
    // SAFETY: the same function with the buffer as the pointer C takes (a reference and a pointer pass alike), so
    // that it writes through a pointer to our 200 bytes rather than through a shared reference to 80.
    unsafe { std::mem::transmute::<Bound, Format>(format)(cinfo, buffer.as_mut_ptr()) };
    let text = buffer.split(|&c| c == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

/// An error: unwinds with its message (libjpeg's `error_exit` must not return).
extern "C-unwind" fn jpeg_failed(cinfo: &mut mozjpeg_sys::jpeg_common_struct) {
    std::panic::resume_unwind(Box::new(jpeg_message_text(cinfo)));
}

/// A warning (level -1) or trace message: running out of data unwinds as an error, the rest are dropped.
extern "C-unwind" fn jpeg_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct, level: std::ffi::c_int) {
    // SAFETY: `cinfo.err` is the manager libjpeg is reporting through.
    let code = unsafe { cinfo.err.as_ref() }.map(|e| e.msg_code);
    if level < 0 && code == Some(mozjpeg_sys::JWRN_JPEG_EOF as std::ffi::c_int) {
        std::panic::resume_unwind(Box::new("truncated: the data ends before the image does".to_string()));
    }
}

extern "C" {
    /// libjpeg-turbo's own test of its SIMD integer IDCT: 0 when built without SIMD (no NASM at build time;
    /// `jsimd_none.c`) or when the CPU lacks it.
    fn jsimd_can_idct_islow() -> std::ffi::c_int;
}

/// Whether JPEG decoding runs libjpeg-turbo's SIMD code (x86-64: when NASM was found at build time; same
/// pixels, about 1.6× faster decoding).
pub fn jpeg_simd() -> bool {
    // SAFETY: a query without arguments, defined by the libjpeg-turbo that mozjpeg-sys links in, with or
    // without SIMD; it only reads the CPU's features, once per thread.
    unsafe { jsimd_can_idct_islow() != 0 }
}

/// libjpeg-turbo's decoding with its defaults (integer IDCT, fancy upsampling), as Pillow decodes.
fn decode_jpeg(bytes: &[u8]) -> Result<(Vec<u8>, usize, usize, usize), String> {
    // libjpeg reports errors by unwinding out of its callbacks (without the panic hook); catch it here.
    std::panic::catch_unwind(|| -> Result<_, String> {
        let jpeg = mozjpeg::decompress::DecompressBuilder::new()
            .with_err(jpeg_errors())
            .from_mem(bytes)
            .map_err(|e| e.to_string())?;
        let (w, h) = (jpeg.width(), jpeg.height());
        if matches!(jpeg.color_space(), mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK) {
            // libjpeg turns YCCK into CMYK; the inks become RGB as Pillow's convert("RGB") makes them.
            let mut cmyk = jpeg.to_colorspace(mozjpeg::ColorSpace::JCS_CMYK).map_err(|e| e.to_string())?;
            let inks: Vec<[u8; 4]> = cmyk.read_scanlines().map_err(|e| e.to_string())?;
            cmyk.finish().map_err(|e| e.to_string())?;
            return Ok((inks.into_iter().flat_map(cmyk_to_rgb).collect(), h, w, 3));
        }
        let mut rgb = jpeg.rgb().map_err(|e| e.to_string())?;
        let rows: Vec<[u8; 3]> = rgb.read_scanlines().map_err(|e| e.to_string())?;
        rgb.finish().map_err(|e| e.to_string())?;
        Ok((rows.into_iter().flatten().collect(), h, w, 3))
    })
    .unwrap_or_else(|payload| {
        let msg =
            payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()));
        Err(msg.unwrap_or_else(|| "libjpeg failed".into()))
    })
}
