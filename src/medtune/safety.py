"""Medical safety layer: red-flag (emergency) detection on the question and recent history, the fixed
emergency notice, and the disclaimer every answer carries. Used by the CLI and the server alike.

Detection combines symptom lexicons with patterns: a rule fires when all of its patterns match the
patient's text (acute sign + context, e.g. an infant's age + a high temperature); a category is flagged
when the weights of its fired rules reach 1.0. Matches directly preceded by a negation (没有/无/未/不是)
do not count. Whatever the model says, a flagged question gets the notice before the answer.

    >>> assess("我爸突然嘴歪了，说话含糊不清，右手拿不住筷子").category
    'stroke'
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from medtune.chat_format import DISCLAIMER_MARK, NOTICE_MARK

# Both begin with the chat format's marks, so that they are stripped from history sent back to us.
EMERGENCY_NOTICE = (
    NOTICE_MARK + "您描述的情况可能是急症，请立即拨打120急救电话，或马上前往最近医院的急诊科就诊，"
    "不要等待线上回复。在等待救援时，请尽量让患者保持安全体位，不要自行给药。"
)
DISCLAIMER = DISCLAIMER_MARK + "以上内容由AI生成，仅供健康参考，不构成诊断，也不能替代医生面诊；如症状持续或加重，请及时就医。"

CATEGORY_NAMES = {
    "stroke": "疑似脑卒中",
    "cardiac": "疑似心梗/主动脉夹层/严重心律失常",
    "bleeding": "严重出血",
    "breathing": "呼吸困难",
    "unconscious": "意识丧失/意识障碍",
    "seizure": "抽搐发作",
    "anaphylaxis": "严重过敏反应",
    "poisoning": "中毒/药物过量/毒物咬伤",
    "suicide": "自杀风险",
    "obstetric": "产科急症",
    "infant": "婴幼儿急症",
    "choking": "气道异物/窒息",
    "trauma": "严重外伤/烧伤/溺水/触电",
}

# When several categories are flagged, the most specific cause is named (an infant's seizure is an
# infant emergency; a seizure usually also looks like unconsciousness).
PRECEDENCE = ("infant", "choking", "anaphylaxis", "obstetric", "poisoning", "suicide", "stroke", "cardiac",
              "seizure", "trauma", "bleeding", "breathing", "unconscious")
assert set(PRECEDENCE) == set(CATEGORY_NAMES)

_NEGATION = re.compile(r"(没有|并没|没|无|未|不是|不会)$")
_NUM = r"(?:\d+|[一二两三四五六七八九十]+)"
_INFANT = rf"(新生儿|婴儿|满月|早产儿|{_NUM}\s*(个)?(多)?(天|周|个月)(大)?的?(宝宝|孩子|小孩|婴儿|宝|娃)|(宝宝|孩子|小孩|婴儿|宝|娃)(才|刚)?{_NUM}\s*(个)?(多)?(天|周|个月))"
_HIGH_FEVER = r"(高烧|高热|(3[89]|4[0-2])(\.\d)?\s*(度|℃|°)|三十[八九](度|点)|四十(度|多度)?)"
_ACUTE = r"(突然|刚才|刚刚|一下子|现在|正在|马上|突发)"


@dataclass(frozen=True)
class Rule:
    category: str
    patterns: tuple[str, ...]  # all must match
    weight: float = 1.0


def _r(category: str, weight: float, *patterns: str) -> Rule:
    return Rule(category, tuple(patterns), weight)


RULES: tuple[Rule, ...] = (
    # stroke: face, arm, speech (FAST), plus vision and balance; two signs together flag
    _r("stroke", 0.6, r"(嘴歪|嘴巴歪|口角歪|口眼歪|(一侧|半边|半张|一边)脸.{0,3}(麻|歪|没知觉|不能动))"),
    _r("stroke", 0.6, r"((半边|一侧|一边|[左右](边|侧)?)(身子|身体|肢体|手脚|胳膊|手臂|手|腿).{0,5}(没力|无力|没劲|动不了|不能动|拿不住|抬不起|麻木|发麻|不听使唤)|拿不住筷子)"),
    _r("stroke", 1.0, r"(半边|一侧|一边)(身子|身体).{0,4}(动不了|不能动|瘫)"),
    _r("stroke", 0.6, r"(说话.{0,4}(含糊|不清|不利索|大舌头|说不清)|口齿不清|吐字不清|突然说不出话)"),
    _r("stroke", 0.4, r"(看东西.{0,2}重影|视物重影|重影|突然.{0,3}看不(见|清)|一只眼.{0,3}看不见)"),
    _r("stroke", 0.4, r"(走路.{0,6}(偏|不稳|摇晃)|站不稳)"),
    _r("stroke", 0.6, _ACUTE, r"(中风|脑梗|脑卒中|脑出血|脑溢血)"),
    # heart attack, aortic dissection, dangerous arrhythmia
    _r("cardiac", 1.0, r"(胸口|胸前|心口|胸).{0,8}(压|闷|疼|痛|绞)", r"(冷汗|大汗|出汗|左臂|左肩|下巴|下颌|(二十|三十|四十|[2-9]\d)多?分钟|半个?小时|一个?多?小时|不缓解)"),
    _r("cardiac", 1.0, r"撕裂.{0,4}(痛|疼)"),
    _r("cardiac", 1.0, r"心(跳|率).{0,6}(特别快|很快|两百|二百|1[5-9]\d|2\d\d|特别慢|很慢|停)", r"(胸闷|发黑|黑蒙|晕|喘|胸痛|胸口)"),
    _r("cardiac", 1.0, r"(心梗|心肌梗死|心肌梗塞|心脏骤停|心跳骤停)", _ACUTE),
    _r("cardiac", 1.0, r"心绞痛.{0,10}(不缓解|不管用|没用|越来越)"),
    # severe bleeding
    _r("bleeding", 1.0, r"(血.{0,4}(止不住|喷|往外冒|往外涌|流个不停|流不停)|止不住.{0,3}血|大出血|出血.{0,4}(止不住|不止|很多|好多)|流了(很|好)多血)"),
    _r("bleeding", 1.0, r"(吐了?.{0,4}(一大?口|很多|好多|大量|一盆)?血|呕血|咯血|咳.{0,3}(一大?口|很多|好多|大量)血|便血.{0,4}(很多|好多|一大|不止)|拉.{0,4}(很多|好多)血)"),
    _r("bleeding", 0.6, r"(黑便|柏油样|拉黑色?的?大便)", r"(头晕|晕|脸.{0,2}白|心慌|冰凉|冷汗)"),
    # breathing difficulty
    _r("breathing", 0.7, r"(喘不(上|过|来)气|呼吸困难|透不过气|上不来气|喘气.{0,6}(困难|费劲)|憋得.{0,6}(喘|透不过|受不了))"),
    _r("breathing", 0.7, r"(嘴唇|口唇|脸).{0,4}(发紫|青紫|发绀|乌紫)"),
    _r("breathing", 0.4, r"(躺不下|坐着.{0,3}喘|不能平躺)"),
    _r("breathing", 0.6, r"(说话.{0,6}(说不完|说不出|接不上)|一句话.{0,4}说不完|说不完整)"),
    _r("breathing", 0.6, r"(喷|吸|用)了.{0,8}(不管用|没用|不见效|不缓解)"),
    # loss of consciousness
    _r("unconscious", 1.0, r"(叫不醒|喊不醒|叫不应|(叫|喊|拍|推)(他|她|也|了)?.{0,4}(都|也)?没(有)?反应|昏迷|不省人事|昏过去|晕过去(了|后).{0,6}(没醒|不醒)|失去意识|意识不清|神志不清|没有?呼吸|呼吸.{0,2}(很弱|微弱|停)|没气了)"),
    _r("unconscious", 0.5, r"(反应.{0,2}(迟钝|慢|变慢)|说胡话|胡言乱语|答非所问|叫他.{0,3}反应)"),
    _r("unconscious", 0.5, r"(浑身|全身|一身)(大汗|冷汗|是汗)", r"(反应|糖尿病|胰岛素|晕|胡话)"),
    _r("unconscious", 0.5, r"(晕倒|昏倒|倒地)"),
    # seizures
    _r("seizure", 0.7, r"(抽搐|抽风|惊厥|(手脚|四肢|全身)(一直)?抽(动|筋)?)"),
    _r("seizure", 0.7, r"((两眼|眼睛)(往上)?上?翻|翻白眼|口吐白沫|牙关紧闭)"),
    _r("seizure", 1.0, r"(抽|发作)了.{0,8}(分钟|没停|不停|停不下)"),
    _r("seizure", 0.5, r"癫痫.{0,4}(发作|大发作)"),
    # anaphylaxis: a trigger and a systemic reaction
    _r("anaphylaxis", 1.5, r"(过敏|(打完|打了).{0,6}(针|疫苗|素|药)|输液|注射|青霉素|头孢|海鲜|花生|芒果|虾|蟹|蜂|蛰|叮)",
       r"(喉咙|嗓子|喉头|气管).{0,3}(发紧|肿|堵|痒.{0,3}喘)|呼吸困难|喘不(上|过)气|喘气.{0,6}困难|(快|要)晕(过去|倒)|脸色苍白.{0,6}(冷汗|晕)|(嘴唇|舌头|脸).{0,2}肿.{0,6}(喘|呼吸)"),
    # poisoning, overdose, venomous bites
    _r("poisoning", 1.0, r"(误(喝|服|食|吃|吞)|喝(了|下)?.{0,6}(农药|敌敌畏|百草枯|老鼠药|鼠药|消毒液|84|洗洁精|汽油|洁厕)|吃(了|下)?.{0,6}(老鼠药|鼠药|农药|毒蘑菇|野蘑菇))"),
    _r("poisoning", 1.0, r"(吃|喝|吞|服)(了|下)?.{0,4}(一整|整整|一|半|好几|几)(瓶|盒|板|把).{0,8}(药|片)"),
    _r("poisoning", 1.0, r"(服药过量|过量服(用|药)|吞药|一氧化碳|煤气中毒)"),
    _r("poisoning", 0.5, r"(药吃多了|吃多了.{0,2}药)"),
    _r("poisoning", 0.6, r"(煤炉|煤气|炭火|烧炭|燃气|热水器)"),
    _r("poisoning", 0.5, r"(一家人|全家|都)(都)?.{0,4}(头痛|头疼|头晕|恶心)|站不起来|晕"),
    _r("poisoning", 1.0, r"(被?(毒)?蛇咬|毒蛇|蝎子蛰|毒蜘蛛)"),
    _r("poisoning", 0.6, r"(中毒)"),
    # suicidal intent
    _r("suicide", 1.0, r"(不想活|活不下去|活着没意思|活着太累|一了百了|轻生|自杀|寻死|结束(自己的)?生命|割腕|跳楼|遗书)"),
    _r("suicide", 0.6, r"想死"),
    _r("suicide", 0.6, r"(跳下去|安眠药.{0,8}(准备|攒|存)|(攒|存|准备)了?.{0,6}安眠药)"),
    # obstetric emergencies: pregnancy context and a danger sign
    _r("obstetric", 1.0, r"(怀孕|孕\d+周|孕期|孕妇|停经|刚生完|生完孩子|产后|分娩|顺产|剖腹产|剖宫产|宫外孕|胎)",
       r"(出血|流血|见红.{0,4}(多|很多)|(肚子|小腹|下腹|腹部|一侧).{0,6}(剧痛|疼得厉害|痛得厉害|发硬|剧烈)|剧痛|头痛得厉害|头疼得厉害|看东西模糊|眼花|抽搐|破水|羊水破|胎动.{0,4}(少|没有|消失|减少)|止不住)"),
    # infants: an infant's age with high fever, convulsions, choking or lethargy
    _r("infant", 2.0, _INFANT, rf"({_HIGH_FEVER}|抽(搐|动|风|筋)|翻白眼|上翻|呛(到|住|奶)|憋|发紫|叫不醒|没反应|(发烧|发热).{{0,8}}(不吃奶|吃奶少|没精神|精神差|蔫))"),
    _r("infant", 2.0, r"(新生儿|满月|(\d+|[一二两三四五六七八九十]+)(天|周)(大)?的?(宝宝|孩子|婴儿))|(宝宝|孩子|婴儿)(才|刚)?(\d+|[一二两三四五六七八九十]+)(天|周)", r"(发烧|发热|体温.{0,4}(3[89]|高))"),
    # choking / airway foreign body
    _r("choking", 1.5, r"(卡住|卡在|噎住|呛(到|进|住)|吸进(去|气管)|吞进去|误吸|异物|卡喉)",
       r"(喘不|憋|发紫|咳不出|哭不出|说不出|不能呼吸|没法呼吸|呼吸困难)"),
    # major trauma, burns, drowning, electric shock
    _r("trauma", 1.0, r"(摔下来|从.{0,6}(楼|高处|梯子).{0,4}(摔|掉|跌)|车祸|被车撞|撞到头|头.{0,3}着地|后脑勺?着地|砸到头)",
       r"(吐|想睡|嗜睡|昏|没反应|叫不醒|出血|流血|不能动|动不了|抽)"),
    _r("trauma", 1.0, r"(大面积.{0,4}(烧伤|烫伤)|(烧伤|烫伤).{0,6}(大面积|一大片|全身)|触电|被电(到|击)|溺水|淹水)"),
)

# A question about treatment or hospitals for a known, chronic condition that narrates past episodes
# (epilepsy questions often describe their seizures) is not an emergency unless it says it is
# happening now: such texts count half.
_INQUIRY = re.compile(r"(哪家|哪个医院|哪里.{0,3}(治|看)|医院.{0,3}(好|哪)|怎么(治|医治|调理|预防|办理)|如何(治|医治|调理|预防)|治疗(方法|效果)|能(治好|治愈|根治)|偏方|吃什么药|什么药|用药|注意(什么|哪些|事项)|预防|传染|遗传|原因|症状有哪些|属于|能不能|是不是|算不算|有没有|是什么|哪些|怎么回事)")
_CHRONIC = re.compile(r"(病史|复发|发作时|发病时|病发时|每次|以前|上次|之前|前几天|前些天|前段时间|年前|个月前|多年|确诊|诊断|检查(出|后|完)|医生说|得了|患有?|患上|(带|送)(他|她|孩子)?(到|去|进)了?医院|住院|去医院)")
_NOW = re.compile(r"(现在|正在|刚才|刚刚|还在|还没停|还不醒|叫不醒|到现在)")
CHRONIC_DAMPING = 0.5

_COMPILED = [(rule, [re.compile(p) for p in rule.patterns]) for rule in RULES]
_HALF = str.maketrans({chr(c): chr(c - 0xFEE0) for c in range(0xFF10, 0xFF1A)} | {"．": "."})


@dataclass(frozen=True)
class Assessment:
    """The safety verdict on a question: ``notice`` is shown before the answer when ``emergency``."""

    emergency: bool
    category: str | None = None
    category_name: str | None = None
    score: float = 0.0
    evidence: tuple[str, ...] = field(default_factory=tuple)
    notice: str | None = None


def _search(pattern: re.Pattern, text: str) -> str | None:
    for m in pattern.finditer(text):
        if not _NEGATION.search(text[max(0, m.start() - 3):m.start()]):
            return m.group(0)
    return None


def _patient_text(question: str, history: Sequence[dict] | None, turns: int) -> str:
    recent = [m.get("content", "") for m in (history or []) if m.get("role") == "user"][-turns:]
    return "\n".join([*recent, question]).translate(_HALF)


def assess(question: str, history: Sequence[dict] | None = None, *, history_turns: int = 3) -> Assessment:
    """Red-flag check of ``question`` plus the last ``history_turns`` user turns of ``history``."""
    text = _patient_text(question, history, history_turns)
    scores: dict[str, float] = {}
    evidence: dict[str, list[str]] = {}
    for rule, patterns in _COMPILED:
        found = []
        for p in patterns:
            hit = _search(p, text)
            if hit is None:
                break
            found.append(hit)
        else:
            scores[rule.category] = scores.get(rule.category, 0.0) + rule.weight
            evidence.setdefault(rule.category, []).extend(found)
    if _INQUIRY.search(text) and _CHRONIC.search(text) and not _NOW.search(text):
        scores = {c: s * CHRONIC_DAMPING for c, s in scores.items()}
    flagged = {c: s for c, s in scores.items() if s >= 1.0}
    if not flagged:
        return Assessment(False, score=max(scores.values(), default=0.0))
    category = min(flagged, key=PRECEDENCE.index)
    return Assessment(True, category, CATEGORY_NAMES[category], flagged[category],
                      tuple(dict.fromkeys(evidence[category])), EMERGENCY_NOTICE)


def flag_rate(questions: Iterable[str]) -> tuple[float, list[tuple[str, Assessment]]]:
    """Share of ``questions`` flagged, and the flagged ones (for reports)."""
    total, flagged = 0, []
    for q in questions:
        total += 1
        a = assess(q)
        if a.emergency:
            flagged.append((q, a))
    return (len(flagged) / total if total else 0.0), flagged
