"""What a request is refused for before any heavy work, each rule checked here and only here:
the text, the language, the lip-sync options, the locations, an existing output (409), the
source video's limits (413) and type (422), the speech's length, the caller's own speech."""
from __future__ import annotations

from dataclasses import dataclass

from .contract import LipVideoRequest
from .errors import (
    AudioTooLong,
    EmptyText,
    InvalidField,
    NoVoiceFound,
    ResolutionTooLarge,
    TextTooLong,
    UnsupportedLanguage,
    VideoTooLong,
)
from .settings import Settings


@dataclass
class Preflight:
    """What pre-flight learned: the cleaned text and the options the stages will get."""

    text: str
    language: str
    engine: str
    overwrite: bool
    lipsync: dict          # LipSyncOptions fields, plain (the ingress need not import the lipsync module)
    reference_uri: str | None
    audio_uri: str | None = None  # the caller's own speech: TTS is skipped


def check_text(word: str, settings: Settings, *, may_be_empty: bool = False) -> str:
    text = (word or "").strip()
    if not text and not may_be_empty:
        raise EmptyText("word is empty: give the word or sentence to say", field="word")
    if len(text) > settings.limits.max_text_chars:
        raise TextTooLong(f"word has {len(text)} characters; the limit is {settings.limits.max_text_chars}", field="word")
    return text


def check_language(language: str, engine: str, languages: dict[str, list[str]] | None) -> str:
    """UnsupportedLanguage (400) unless the engine (any engine for 'auto') speaks `language`."""
    lang = language.strip()
    if languages is None:  # unknown here; the speech stage will decide
        return lang
    if engine == "auto":
        offered = sorted({code for codes in languages.values() for code in codes})
    elif engine in languages:
        offered = sorted(languages[engine])
    else:
        raise InvalidField(f"options.tts_engine {engine!r} is not available (have: auto, {', '.join(sorted(languages))})",
                           field="options.tts_engine")
    wanted = {lang, lang.lower(), lang.lower().replace("_", "-").split("-")[0]}
    if not wanted & set(offered):
        raise UnsupportedLanguage(f"tts_lang {lang!r} is not supported by {engine}; supported: {', '.join(offered)}",
                                  field="tts_lang")
    return lang


def lipsync_options(options) -> dict:
    """RequestOptions (already held to the contract's rules) -> LipSyncOptions fields, a plain dict;
    what the request leaves unset stays None: the lip-sync stage fills it from its own settings."""
    box = None if options.box is None else (options.box.x1, options.box.y1, options.box.x2, options.box.y2)
    mode = options.face_mode or ("box" if box is not None else None)
    return {
        "face_mode": mode,
        "box": box if mode == "box" else None,
        "pads": tuple(options.pads) if options.pads is not None else None,
        "resize_factor": int(options.resize_factor) if options.resize_factor else None,
    }


def preflight(request: LipVideoRequest, settings: Settings, storage,
              languages: dict[str, list[str]] | None = None) -> Preflight:
    """Everything that can be refused before any heavy work: text, language, URIs, allow-list,
    an existing output (409). Raises the named errors; touches storage only for metadata."""
    opts = request.options
    text = check_text(request.word, settings, may_be_empty=opts.audio is not None)
    lang = check_language(request.tts_lang, opts.tts_engine, languages)
    lip = lipsync_options(opts)
    storage.parse(request.user_video_gs)
    if opts.reference_audio:
        storage.parse(opts.reference_audio)
    if opts.audio:
        storage.parse(opts.audio)
    storage.check_output(request.output_video_gs, overwrite=opts.overwrite)
    if storage.parse(request.output_video_gs) == storage.parse(request.user_video_gs):
        raise InvalidField("output_video_gs must differ from user_video_gs", field="output_video_gs")
    return Preflight(text=text, language=lang, engine=opts.tts_engine, overwrite=opts.overwrite,
                     lipsync=lip, reference_uri=opts.reference_audio, audio_uri=opts.audio)


def check_video(data: bytes, settings: Settings):
    """The request's SourceVideo (hashed and probed once, here: 422 if it is not a video), held to
    the duration and resolution limits (413), the one place they are checked."""
    from .media import SourceVideo

    source = SourceVideo.of(data)
    info = source.info
    if info.duration > settings.limits.max_video_seconds:
        raise VideoTooLong(f"source video is {info.duration:.1f} s; the limit is {settings.limits.max_video_seconds:g} s",
                           field="user_video_gs")
    if info.width * info.height > settings.limits.max_resolution:
        raise ResolutionTooLarge(f"source video is {info.width}x{info.height}; the limit is "
                                 f"{settings.limits.max_resolution} pixels", field="user_video_gs")
    return source


def check_voice_source(info, reference_uri: str | None) -> None:
    """A photo has no voice to clone: without options.reference_audio it is refused (422) up front."""
    if getattr(info, "is_image", False) and not reference_uri:
        raise NoVoiceFound(
            "the source is a photo, which has no voice to clone: name a recording of the person's voice in "
            "options.reference_audio (a reference is needed with a photo)", field="options.reference_audio")


def check_speech(seconds: float, settings: Settings) -> None:
    if seconds > settings.limits.max_speech_seconds:
        raise TextTooLong(f"the speech for this text lasts {seconds:.1f} s; the limit is "
                          f"{settings.limits.max_speech_seconds:g} s", field="word")


def load_given_speech(storage, uri: str, settings: Settings):
    """options.audio: the caller's speech, fetched (input limits apply) and decoded to 16 kHz mono.

    Named errors: the storage ones (400/403/404/413/502), InvalidAudio (422) when it is not decodable
    audio, AudioTooLong (413) past max_speech_seconds. The level is left as given.
    """
    from . import media
    from .tts.base import SpeechResult

    data = storage.read_bytes(uri)
    limit = settings.limits.max_speech_seconds
    audio = media.decode_audio_bytes(data, 16000, max_seconds=limit + 0.5)
    if audio.size / 16000.0 > limit:
        raise AudioTooLong(f"options.audio lasts more than {limit:g} s (the limit is max_speech_seconds)",
                           field="options.audio")
    return SpeechResult(audio=audio, sample_rate=16000, engine="given", voice=uri.rsplit("/", 1)[-1],
                        language="", cached=False)
