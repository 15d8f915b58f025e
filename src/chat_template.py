"""RWKV's chat format, the one home of it (training data, show_data.py and generate.py --chat).

BlinkDL's RWKV7-G1x-templates.txt, ChatRWKV and the rwkv package's API_DEMO_CHAT.py:
`System: xxx\\n\\nUser: xxx\\n\\nAssistant: xxx\\n\\nUser: xxx\\n\\nAssistant:`. A turn holds no blank line
(the separator is one), the final `Assistant:` has no space after it (the reply starts with one), and chat
runtimes stop a reply at the first `\\n\\n`.
"""
import re

ROLES = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}  # role -> prefix in the text
SEP = '\n\n'  # ends every turn; a reply is cut at its first occurrence


def clean_turn(text):
    """A turn's text as the official template cleans it: CRLF to LF, blank lines squeezed, ends stripped."""
    return re.sub(r'\n{2,}', '\n', text.replace('\r\n', '\n')).strip()


def turn_text(role, content):
    """One whole turn, separator included: `User: hi\\n\\n`."""
    return f'{ROLES[role]}: {clean_turn(content)}{SEP}'


def chat_prompt(message, system=None):
    """What a chat runtime sends for a user message: `[System: ...\\n\\n]User: msg\\n\\nAssistant:`."""
    head = turn_text('system', system) if system else ''
    return head + turn_text('user', message) + ROLES['assistant'] + ':'


def render(messages):
    """(text, spans) for a list of {"role", "content"} messages, each turn cleaned.

    spans: (start, end) character offsets of each assistant reply in text, from the space after `Assistant:`
    to the end of its closing `\\n\\n` (what a fine-tune learns, so it learns to stop where runtimes stop)."""
    text, spans = '', []
    for m in messages:
        role = m['role']
        if role == 'assistant':
            text += ROLES[role] + ':'
            start = len(text)
            text += ' ' + clean_turn(m['content']) + SEP
            spans.append((start, len(text)))
        else:
            text += turn_text(role, m['content'])
    return text, spans
