"""The page's words in English and Chinese (`gr.I18n`): the page follows the browser's language, and
Gradio's Settings panel (footer) switches it. Keys are the English texts, so the layout reads as English.

Example:
    >>> ZH["Edit"]
    '编辑'
"""

from __future__ import annotations

from typing import Any

from qie.app.presets import PRESETS, REPEATED_EDIT_WARNING

INTRO = (
    "# qie: instruction-based image editing\n"
    "Upload a photo, describe the change or pick a preset, press **Edit**. "
    "Model: [Qwen-Image-Edit-2509](https://huggingface.co/Qwen/Qwen-Image-Edit-2509). "
    "Language: the browser's, or Settings (page footer)."
)
INTRO_ZH = (
    "# qie：用一句话编辑图片\n"
    "上传照片，描述要做的修改或选择一个预设，然后点击 **编辑**。"
    "模型：[Qwen-Image-Edit-2509](https://huggingface.co/Qwen/Qwen-Image-Edit-2509)。"
    "语言：跟随浏览器，或在页脚的“设置”中切换。"
)
ZH = {
    INTRO: INTRO_ZH,
    "Image": "图片",
    "Image 2": "图片 2",
    "Image 3": "图片 3",
    "More images (optional, up to 3 in all)": "更多图片（可选，最多 3 张）",
    "Region (optional): brush where the edit goes": "区域（可选）：涂抹要修改的地方",
    "Brush the region on the image; outside it the photo stays exactly as it is": (
        "在图片上涂抹区域；区域外的像素保持不变"
    ),
    "Instruction": "编辑指令",
    "e.g. Replace the background with pure white (Enter to edit)": "例如：把背景换成纯白色（按回车开始编辑）",
    "E-commerce presets (fill the instruction)": "电商预设（填入编辑指令）",
    "Language": "语言",
    "Rewrite the instruction first": "先改写编辑指令",
    "Rewritten instruction": "改写后的指令",
    "Price tag text": "价格标签文字",
    "Outputs (consecutive seeds, one batch)": "输出数量（连续种子，一次批量生成）",
    "Aspect": "宽高比",
    "Edit": "编辑",
    "Cancel": "取消",
    "Advanced": "高级设置",
    "Mode": "模式",
    "Steps": "步数",
    "True CFG scale (1 = off, 2x faster)": "True CFG 强度（1 = 关闭，快一倍）",
    "Negative prompt": "反向提示词",
    "Seed": "种子",
    "Randomize seed": "随机种子",
    "Longest output side (px; 0 = auto, ~1 megapixel)": "输出最长边（像素；0 = 自动，约一百万像素）",
    "Return at the input's size": "按输入图片的尺寸返回",
    "Encode the input images at": "输入图片的编码尺寸",
    "VAE tile size": "VAE 分块大小",
    "Attention / KV quantization": "注意力 / KV 量化",
    "Early exit": "提前结束",
    "Before / after": "修改前 / 修改后",
    "Outputs: pick one to view, download or use as input": "输出：选择一张查看、下载或作为输入",
    "Stats": "统计",
    "Download PNG": "下载 PNG",
    "Use as input": "作为输入",
    "Metrics (all visitors, aggregate)": "指标（所有访客的汇总）",
    "Requests, latency, GPU memory": "请求数、延迟、显存",
    "Refresh": "刷新",
    "History (this browser tab only): pick one to restore its image and settings": (
        "历史（仅本标签页）：选择一条恢复其图片和设置"
    ),
    "Examples (CC0 / public-domain photos)": "示例（CC0 / 公有领域照片）",
    "Examples in Chinese": "中文示例",
    **{
        p.label: label
        for p, label in zip(PRESETS.values(), ("白色背景", "去除水印 / 标志", "添加价格标签", "三项全做"), strict=True)
    },
}


# The app's own messages (toasts, the stats line after Cancel) in the language of the request's
# browser (its Accept-Language); errors from the library keep their English fix text, after the
# control's name in that language.
MESSAGES = {
    "cancelled_after": ("Cancelled after {step} of {total} steps.", "已取消：共 {total} 步，完成了 {step} 步。"),
    "cancelled_early": ("Cancelled before denoising started.", "已取消：去噪尚未开始。"),
    "cancelled_none": (
        "Cancelled: no edit of yours was running (a waiting one is dropped).",
        "已取消：你没有正在运行的编辑（排队中的编辑会被移除）。",
    ),
    "no_result": ("There is no result yet: press Edit first.", "还没有结果：请先点击“编辑”。"),
    "repeated_edit": (
        REPEATED_EDIT_WARNING,
        "每次在已编辑的图片上再编辑，质量都会略有下降；如需多处修改，建议在原图上用一条合并的指令。",
    ),
}
FIXES_ZH = {"upload an image first": "请先上传图片"}  # the app's own fixes
LABELS_ZH = {
    "Image": "图片",
    "Image 2": "图片 2",
    "Image 3": "图片 3",
    "Instruction": "编辑指令",
    "Negative prompt": "反向提示词",
    "Steps": "步数",
    "True CFG scale": "True CFG 强度",
    "Seed": "种子",
    "Longest output side": "输出最长边",
    "Encode the input images at": "输入图片的编码尺寸",
    "Mode": "模式",
    "VAE tile size": "VAE 分块大小",
    "Attention / KV quantization": "注意力 / KV 量化",
    "Early exit": "提前结束",
    "Price tag text": "价格标签文字",
    "Outputs": "输出数量",
    "Aspect": "宽高比",
}


def language_of(request: Any) -> str:
    """ "zh" when the request's browser prefers Chinese, else "en"."""
    headers = getattr(request, "headers", None) or {}
    accept = str(headers.get("accept-language", "")).lower()
    return "zh" if accept.startswith("zh") else "en"


def say(key: str, language: str, **values: Any) -> str:
    """The app's message `key` in `language` ("en" or "zh")."""
    en, zh = MESSAGES[key]
    return (zh if language == "zh" else en).format(**values)


def label(text: str, language: str) -> str:
    """A control's name in `language` (messages name the controls as the page shows them)."""
    return LABELS_ZH.get(text, text) if language == "zh" else text


def fix_text(fix: str, language: str) -> str:
    """One of the app's own fixes in `language` (others stay as the library wrote them)."""
    return FIXES_ZH.get(fix, fix) if language == "zh" else fix


def translations() -> Any:
    """The `gr.I18n` of the page: English (the keys) and Chinese."""
    import gradio as gr

    return gr.I18n(en={key: key for key in ZH}, zh=ZH)


def t(text: str) -> Any:
    """`text` as a translatable string (shown in the browser's language); unknown texts stay as they are."""
    if text not in ZH:
        return text
    from gradio.i18n import I18nData

    return I18nData(text)
