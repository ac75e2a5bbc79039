"""The experiment harness: training recipes (``padst-train``), the reproduction sweep (``padst-reproduce``), the
bundled and fetched datasets, checkpoint loading and the demo.

Not imported by ``import padst_ext``: the library's core (ops, structures, layers, DST) needs none of this
package's optional dependencies (``pip install padst_ext[recipes]``: timm, transformers, tiktoken, tqdm,
matplotlib), and each of them is imported only by the function that uses it.
"""
