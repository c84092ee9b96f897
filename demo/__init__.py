"""``fss-demo``: a web page (Gradio) to paint support masks and see queries segmented.

Nothing heavy is imported here: Gradio loads only when the page is built (``fss.demo.app``); the
framework-free state lives in ``fss.demo.session``.
"""
