"""Classifier-free guidance (Sanchez et al. 2023): the reference at scales 1, 1.5 and 3 against its
unconditional context, then against a negative prompt at 1.5 -> REF: g, REF[neg]: 1 - g."""

from common import MAX_TOKENS, MESSAGES, REF, client, show

c = client()
for scale in (1.0, 1.5, 3.0):
    r = c.chat.completions.create(model=REF, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"mixture": {"guidance": {"policy": REF, "scale": scale}}})
    print(f"scale {scale}:", r.choices[0].message.content)
print("scale 1.5, negative prompt 'Answer rudely and vaguely.':")
show(c.chat.completions.create(model=REF, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, extra_body={
    "mixture": {"guidance": {"policy": REF, "scale": 1.5, "negative_prompt": "Answer rudely and vaguely."}}}))
