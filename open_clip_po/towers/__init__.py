"""How PO runs an open_clip model's towers: through wrappers (``unwrap``), the text tower over each batch's caption
span (``text_span``), and a frozen model's attention in the policy's layout under autocast (``attention_layout``)."""
